"""Source-model engines kept for the queries, labels and scores stages: the model loads once per actor.

Ray Data's ``map_batches`` (and ``ray.data.llm``, which builds on it) starts a fresh actor pool for
every pass, so three stages, and every query-writing round, would load the source model again: for
a 70B source that is minutes and 141 GB read each time. Here N engine actors are started once per
run (``EngineFleet``), each holding the source base and adapter (the adapter is switched off for
query writing and for the amateur pass), and every stage streams its rows through them: a Ray Data
``map_batches`` over N lightweight forwarders, one bound to each engine.

Placement follows ``engines.placement`` (a placement group per tensor-parallel vLLM engine). The
forwarders and the Parquet writes while the fleet lives take no CPU of their own: on a small node
the engines may hold every core, and a Ray Data task that waits for one would wait forever.
"""

from __future__ import annotations

import pyarrow as pa

from titok.runstate import RunDir

__all__ = ["EngineActor", "EngineFleet"]


class EngineActor:
    """One engine (one model copy) in a Ray actor; ``run`` applies a stage operation to a batch."""

    def __init__(self, run_dir: str, engine: dict, threads: int):
        import ray
        import torch

        from titok.engines import build_engine

        if not ray.get_gpu_ids():
            torch.set_num_threads(threads)  # on CPU the actor uses the cores it reserved
        self.engine = build_engine(**engine)
        self.run_dir = RunDir(run_dir)
        self.run_dir.log_event(event="model_load", stage="engine", model=engine["base"], adapter=engine.get("adapter"),
                               node_id=ray.get_runtime_context().get_node_id(), gpu_ids=[str(g) for g in ray.get_gpu_ids()],
                               dtype=getattr(self.engine, "dtype_choice", None))
        self._backend_logged = False

    def ready(self) -> bool:
        return True

    def run(self, operation: str, batch: dict, params: dict | None):
        from titok.stages.inference import OPERATIONS

        out = OPERATIONS[operation](self.engine, batch, params)
        backend = getattr(self.engine, "scoring_backend", None)
        if operation == "scores" and backend and not self._backend_logged:  # vLLM's calibration verdict
            self.run_dir.log_event(event="scoring_backend", stage="scores", backend=backend)
            self._backend_logged = True
        return out


class _Slots:
    """Hands out engine indices 0, 1, ... to the forwarders of one pass."""

    def __init__(self):
        self.next = 0

    def take(self) -> int:
        self.next += 1
        return self.next - 1


class _Forward:
    """Ray Data UDF bound to one engine actor: passes its batches through."""

    def __init__(self, actors: list, slots, operation: str, params: dict | None):
        import ray

        self.actor = actors[ray.get(slots.take.remote()) % len(actors)]
        self.operation, self.params = operation, params

    def __call__(self, batch: dict):
        import ray

        return ray.get(self.actor.run.remote(self.operation, batch, self.params))


class EngineFleet:
    """N engine actors for one run; ``map`` streams a dataset through them; ``close`` frees them."""

    def __init__(self, run_dir: str, engine: dict, actors: int, options: dict, batch_size: int, threads: int,
                 actor_class: type = EngineActor):
        import ray

        options = dict(options)
        make_group = options.pop("placement", None)  # one placement group per engine
        remote = ray.remote(actor_class)
        self.actors, self.groups = [], []
        for _ in range(actors):
            placed = make_group() if make_group else {}
            if placed:
                self.groups.append(placed["scheduling_strategy"].placement_group)
            self.actors.append(remote.options(**options, **placed).remote(run_dir, engine, threads))
        ray.get([a.ready.remote() for a in self.actors])  # surface a load error here, once
        self.batch_size = batch_size

    def map(self, rows: pa.Table, operation: str, params: dict | None = None):
        """``rows`` through ``operation`` on every engine; returns a Ray Dataset."""
        import ray

        if rows.num_rows == 0:
            return ray.data.from_arrow(rows)
        # one block per batch, made on the driver (no CPU task runs while the engines hold the cores);
        # each block is passed on whole (batch_size=None)
        blocks = [rows.slice(start, self.batch_size) for start in range(0, rows.num_rows, self.batch_size)]
        slots = ray.remote(num_cpus=0)(_Slots).remote()
        return ray.data.from_arrow(blocks).map_batches(
            _Forward, fn_constructor_kwargs={"actors": self.actors, "slots": slots, "operation": operation, "params": params},
            compute=ray.data.ActorPoolStrategy(size=min(len(self.actors), len(blocks))), num_cpus=0,
            batch_size=None, batch_format="numpy")

    def close(self) -> None:
        """Free the engines (and their placement groups) for the stages after scoring."""
        import ray
        from ray.util import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        for group in self.groups:
            remove_placement_group(group)
        self.actors, self.groups = [], []
