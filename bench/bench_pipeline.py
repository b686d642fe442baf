"""The demo transplant end to end: wall-clock against the sum of its stages' compute (what Ray and
the start-up cost on top), per-stage seconds, and each actor's peak RSS.

    python bench/bench_pipeline.py            # writes bench/results/pipeline.json (about 8 min on 2 cores)

Runs ``configs/demo.yaml`` (the README demo: SmolLM2-135M-Instruct's boolean_expressions LoRA ->
Gemma-3-270M) into a fresh run directory, with the demo's source adapter (``titok sft`` trains it
first if ``runs/demo/source-adapter`` is missing). Wall-clock counts everything from the call to the
exported adapter: validation, Ray start, the plan, model loads, every stage.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import ray

    from titok.config import load_config
    from titok.workflows.pipeline import transplant
    from titok.runstate import RunDir

    source = REPO / "runs" / "demo" / "source-adapter"
    if not (source / "adapter_config.json").is_file():
        from titok.config import TrainConfig
        from titok.workflows.sft import SFT_DEFAULTS, train_source_adapter

        train_source_adapter("smollm2-135m", "boolean_expressions", source, TrainConfig(**SFT_DEFAULTS))
    run_dir = REPO / "runs" / "bench-pipeline"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"run_dir={run_dir}", f"source_adapter={source}"])
    started = time.perf_counter()
    result = transplant(cfg)
    wall = time.perf_counter() - started
    stages = {name: info.get("seconds") for name, info in result["stages"].items() if info.get("seconds") is not None}
    events = RunDir(run_dir).events()
    report = {
        "benchmark": "demo transplant wall-clock vs the sum of its stages",
        "machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "cores": ray.cluster_resources().get("CPU")},
        "config": "configs/demo.yaml", "dtypes": result.get("dtypes"),
        "wall_seconds": round(wall, 1), "stage_seconds": stages, "sum_of_stages": round(sum(stages.values()), 1),
        "overhead_ratio": round(wall / sum(stages.values()), 3), "target": "overhead_ratio <= 1.25",
        "peak_rss_mib": {"engines": [e["peak_rss_mib"] for e in events if e.get("event") == "engines_closed"],
                         "train_workers": [e["peak_rss_mib"] for e in events if e.get("event") == "train_done"]},
    }
    out = REPO / "bench" / "results" / "pipeline.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
