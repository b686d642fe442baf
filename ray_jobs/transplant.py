"""Transplant job for ``ray job submit``: joins the cluster the job runs on (RAY_ADDRESS, set by the
job server), or starts a local Ray when run by hand. Same arguments as ``titok transplant``.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env ray_jobs/runtime_env.yaml \\
        -- python ray_jobs/transplant.py --config configs/demo.yaml --set run_dir=/shared/runs/x

run_dir should be on storage every node sees (NFS, or a path synced by the cluster) for multi-node
runs: stage outputs and the Ray Train checkpoints are written there.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds titok/

from titok.cli import run  # noqa: E402

if __name__ == "__main__":
    run(["transplant", *sys.argv[1:]])
