"""How long the held-out answers check takes under ZeRO-3: the base gathered once per rate against a
gather at every decode step, on local Ray (2 CPU workers, gloo).

    python bench/bench_zero3_answers.py     # writes bench/results/zero3_answers.json (a few minutes on 2 cores)

The real SmolLM2-135M as the target, trained one epoch on 12 boolean_expressions samples (reference
rationales, seeded token weights) under ZeRO-3 on two workers; 4 are held out and the LoRA answers all
4 after its last step (``train.validation_generations``). Run twice, the same job but for
``train.gather_base_for_answers``: ``auto`` (the 135M base fits: gathered once, each rank answers its
share) and ``never`` (every decode step gathers it; every rank answers all 4 in step). Each run's
``held_out_answers`` events give each rank's seconds and queries; the two runs' shares and spreads must be equal.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rows(tokenizer, n: int = 12) -> list[dict]:
    from titok import columns as C
    from titok.core.sequences import encode_response
    from titok.tasks import load_task, reference_response

    rng = np.random.default_rng(0)
    rows = []
    for i, example in enumerate(load_task("boolean_expressions", seed=0).train_examples[:n]):
        response = reference_response(example)
        weights = rng.uniform(0.2, 1.0, len(encode_response(tokenizer, response)[0])).astype(np.float32)
        rows.append({C.SAMPLE_ID: i, C.QUERY: example["input"], C.RESPONSE: response, C.TARGET_WEIGHTS: weights})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "zero3_answers.json"))
    args = parser.parse_args()

    import ray
    import torch

    from titok.config import TrainConfig
    from titok.models import load_tokenizer, resolve_model_path
    from titok.runstate import RunDir
    from titok.train.job import TrainingJob
    from titok.train.ray_train import run_training

    target = resolve_model_path("smollm2-135m")
    rows = _rows(load_tokenizer(target, False))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    try:
        for gather in ("auto", "never"):
            run_dir = Path(tempfile.mkdtemp(prefix=f"zero3-answers-{gather}-"))
            train = TrainConfig(workers=2, deepspeed_stage=3, epochs=1, global_batch_size=4, micro_batch_size=2, lr=1e-3,
                                dtype="float32", validation_fraction=1 / 3, validation_generations=4,
                                gather_base_for_answers=gather)
            job = TrainingJob.of(train, target, seed=0, run_dir=str(run_dir), max_length=256, k=0.7)
            started = time.perf_counter()
            outcome = run_training({"default": (ray.data.from_items(rows), job)}, storage_path=str(run_dir / "ray"),
                                   log_dir=str(run_dir))["default"]
            if outcome.error:
                raise SystemExit(f"gather_base_for_answers={gather}: {outcome.error}")
            answers = [e for e in RunDir(run_dir).events() if e["event"] == "held_out_answers"]
            results[gather] = {
                "wall_s": round(time.perf_counter() - started, 1),
                "answers_s_per_rank": [e["seconds"] for e in sorted(answers, key=lambda e: e["rank"])],
                "queries_per_rank": [e["queries"] for e in sorted(answers, key=lambda e: e["rank"])],
                "base_gathered_once": answers[0]["base_gathered_once"],
                "val_answers_end": outcome.metrics["val_answers_end"],
                "answers_spread": {k: outcome.metrics[k] for k in ("val_answers_top", "val_answers_top_share",
                                                                    "val_answers_collapsed")},
            }
    finally:
        ray.shutdown()
    same = all(results["auto"][k] == results["never"][k] for k in ("val_answers_end", "answers_spread"))
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "torch": torch.__version__, "cores": 2},
        "setup": "SmolLM2-135M target, ZeRO-3, 2 CPU workers (gloo), 12 samples, 4 held out and answered after 1 epoch",
        "runs": results,
        "same_answers": same,
        "answers_speedup": round(max(results["never"]["answers_s_per_rank"]) / max(results["auto"]["answers_s_per_rank"]), 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if not same:
        raise SystemExit("the two ways of gathering gave different answers")


if __name__ == "__main__":
    main()
