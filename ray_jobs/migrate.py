"""Zoo migration job for ``ray job submit``: every adapter of a manifest onto a new base in one job,
with the source model loaded once per engine actor; the zoo folder (migrated adapters, summaries,
serving file) lands in the manifest's out_dir (put it on storage every node sees).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env ray_jobs/runtime_env.yaml \\
        -- python ray_jobs/migrate.py --config configs/zoo-demo.yaml --set out_dir=/shared/zoo

A resubmitted job resumes: finished stages and adapters are reused.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds titok/

from titok.cli import run  # noqa: E402

if __name__ == "__main__":
    run(["migrate", *sys.argv[1:]])
