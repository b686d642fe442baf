"""Transplant job for ``ray job submit``: joins the cluster the job runs on (RAY_ADDRESS, set by the
job server), or starts a local Ray when run by hand.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env ray_jobs/runtime_env.yaml \\
        -- python ray_jobs/transplant.py --config configs/demo.yaml --set run_dir=/shared/runs/x

run_dir should be on storage every node sees (NFS, or a path synced by the cluster) for multi-node
runs: stage outputs and the Ray Train checkpoints are written there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds titok/

from titok.config import ConfigError, load_config  # noqa: E402
from titok.pipeline import STAGES, format_summary, transplant  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="transplant YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--until", choices=STAGES, help="stop after this stage")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        result = transplant(cfg, until=args.until)
    except ConfigError as err:
        print(f"titok: {err}", file=sys.stderr)
        return 2
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
