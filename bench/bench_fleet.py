"""Does every engine stay busy? The engine fleet's hand-out of rows, measured on local Ray.

    python bench/bench_fleet.py     # writes bench/results/fleet.json (about a minute on 2 cores)

A cluster user's labels pass: 500 rows on 16 engines, answers of 8-256 tokens (uniform, seeded), at
most ``batch_size`` = 64 rows per call. The engines are stand-ins (``TimedEngine``: a real Ray actor
with the fleet's actor interface that sleeps 1 ms per answer token of each row, so it holds no CPU
and 16 fit on a 2-core machine); the dispatch is the real one (``EngineFleet.map``). ``before`` is the
hand-out this replaced: fixed batches of ``batch_size`` rows through ``ray.util.ActorPool``.

For each: wall-clock against the ideal (total work / engines), and each engine's busy fraction, over
the whole pass and until the queue is empty (the last batch handed out). Targets: every engine
>= 90% busy until the queue is empty, wall <= 1.15x ideal.
"""

from __future__ import annotations

import json
import platform
import random
import sys
import time
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROWS, ENGINES, BATCH_SIZE, SECONDS_PER_TOKEN = 500, 16, 64, 0.001


class TimedEngine:
    """The fleet's engine actor interface; a batch takes 1 ms per answer token of its rows."""

    def __init__(self, run_dir: str, engine: dict, threads: int):
        self.spans: list[tuple[float, float]] = []

    def ready(self):
        import ray

        return ray.get_runtime_context().get_node_id(), []

    def run(self, operation: str, rows: pa.Table, params: dict | None) -> pa.Table:
        start = time.time()
        time.sleep(sum(rows.column("tokens").to_pylist()) * SECONDS_PER_TOKEN)
        self.spans.append((start, time.time()))
        return rows

    def take_spans(self) -> list[tuple[float, float]]:
        spans, self.spans = self.spans, []
        return spans

    def shutdown(self) -> None:
        pass

    def peak_rss_mib(self) -> float:
        return 0.0


def fixed_batches_through_actor_pool(fleet, rows: pa.Table) -> None:
    """The hand-out before: batch_size rows at a time, ``ray.util.ActorPool``."""
    from ray.util import ActorPool

    batches = [rows.slice(start, BATCH_SIZE) for start in range(0, rows.num_rows, BATCH_SIZE)]
    list(ActorPool(fleet.actors).map(lambda actor, batch: actor.run.remote("labels", batch, None), batches))


def measure(fleet, rows: pa.Table, dispatch) -> dict:
    import ray

    ray.get([actor.take_spans.remote() for actor in fleet.actors])
    start = time.time()
    dispatch(fleet, rows)
    wall = time.time() - start
    spans = ray.get([actor.take_spans.remote() for actor in fleet.actors])
    queue_empty = max((s for engine in spans for s, _ in engine), default=start)  # the last batch handed out
    ideal = sum(rows.column("tokens").to_pylist()) * SECONDS_PER_TOKEN / ENGINES

    def busy(engine, until):
        return sum(max(0.0, min(e, until) - max(s, start)) for s, e in engine) / max(until - start, 1e-9)

    whole = [round(busy(engine, start + wall), 3) for engine in spans]
    until_empty = [round(busy(engine, queue_empty), 3) for engine in spans]
    return {"wall_s": round(wall, 3), "ideal_s": round(ideal, 3), "wall_over_ideal": round(wall / ideal, 3),
            "calls": sum(len(engine) for engine in spans), "engines_with_work": sum(1 for engine in spans if engine),
            "busy_fraction_until_queue_empty": until_empty, "min_busy_until_queue_empty": min(until_empty),
            "busy_fraction_whole_pass": whole, "min_busy_whole_pass": min(whole)}


def main() -> None:
    import ray
    import torch

    from titok.stages.fleet import EngineFleet

    rng = random.Random(0)
    rows = pa.table({"sample_id": list(range(ROWS)), "tokens": [rng.randint(8, 256) for _ in range(ROWS)]})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        fleet = EngineFleet("/tmp/titok-bench-fleet", {}, ENGINES, {"num_cpus": 0}, BATCH_SIZE, 1,
                            actor_class=TimedEngine)
        before = measure(fleet, rows, fixed_batches_through_actor_pool)
        after = measure(fleet, rows, lambda f, r: f.map(r, "labels", on_batch=lambda n: None))
        fleet.close()
    finally:
        ray.shutdown()
    result = {
        "benchmark": "engine fleet hand-out: 500 rows of 8-256 answer tokens on 16 stand-in engines, <= 64 rows a call",
        "machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "cpu": platform.processor() or platform.machine(), "cores": __import__("os").cpu_count()},
        "targets": {"min_busy_until_queue_empty": 0.9, "wall_over_ideal": 1.15},
        "before": before, "after": after,
        "meets_targets": after["min_busy_until_queue_empty"] >= 0.9 and after["wall_over_ideal"] <= 1.15,
    }
    out = REPO / "bench" / "results" / "fleet.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("before", "after", "meets_targets")}, indent=2))


if __name__ == "__main__":
    main()
