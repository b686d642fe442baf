"""Compare job for ``ray job submit``: TiTok vs. vanilla, KD and ablations over tasks x targets x
seeds, with the report folder under ``out_dir/report`` (put out_dir on storage every node sees).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env ray_jobs/runtime_env.yaml \\
        -- python ray_jobs/compare.py --config configs/compare.yaml --num-seeds 3 --set out_dir=/shared/compare

A resubmitted job resumes: finished transplants and evaluations are reused.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds titok/

from titok.cli import run  # noqa: E402

if __name__ == "__main__":
    run(["compare", *sys.argv[1:]])
