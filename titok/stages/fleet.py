"""Source-model engines kept for the queries, labels and scores stages: the model loads once per actor.

Ray Data's ``map_batches`` (and ``ray.data.llm``, which builds on it) starts a fresh actor pool for
every pass, so three stages, and every query-writing round, would load the source model again: for
a 70B source that is minutes and 141 GB read each time. Here N engine actors are started once per
run (``EngineFleet``), each holding the source base and its adapters (an adapter is switched off to
write queries and for the amateur pass), and every stage sends its rows through them in batches,
``ray.util.ActorPool`` keeping each engine busy. Ray Data is not used for this hop because it cannot
stream through actors it did not start: forwarding actors stall as soon as the engines hold every
CPU of a node (its executor waits for a free CPU; seen on the 2-core machine, where one engine with
``cpus_per_actor: 2`` holds both). Stage rows are small (text and per-token arrays) and travel as
Arrow tables.

Placement follows ``engines.placement`` (a placement group per tensor-parallel vLLM engine).
Closing shuts each engine down through its own ``shutdown`` first (vLLM's engine core and its worker
processes, which a killed actor would orphan on the GPU), then kills the actors; ``gpus`` names what
they held, for ``readiness.wait_for_free_gpus``.
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

    def ready(self) -> tuple[str, list[int]]:
        """Where this engine runs: its node and the GPUs Ray gave it."""
        import ray

        return ray.get_runtime_context().get_node_id(), [int(g) for g in ray.get_gpu_ids()]

    def shutdown(self) -> None:
        """The engine frees its devices itself (vLLM: engine core and workers) before the actor dies."""
        self.engine.shutdown()

    def peak_rss_mib(self) -> float:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    def run(self, operation: str, rows: pa.Table, params: dict | None) -> pa.Table:
        from titok.stages.arrow import numpy_columns, table
        from titok.stages.inference import OPERATIONS

        out = OPERATIONS[operation](self.engine, numpy_columns(rows), params)
        backend = getattr(self.engine, "scoring_backend", None)
        if "scores" in operation and backend and not self._backend_logged:  # vLLM's calibration verdict
            self.run_dir.log_event(event="scoring_backend", stage="scores", backend=backend)
            self._backend_logged = True
        if isinstance(out, tuple):  # one table per stage (labels+scores)
            return tuple(part if isinstance(part, pa.Table) else table(part) for part in out)
        return out if isinstance(out, pa.Table) else table(out)


def _bundle_gpus(group) -> list[tuple[str, int]]:
    """(node id, GPU index) of each bundle of an engine's placement group, read by a task in each
    before the engine starts (Ray keeps a bundle's GPU for its life)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_gpus=1, num_cpus=0)
    def where() -> tuple[str, int]:
        return ray.get_runtime_context().get_node_id(), int(ray.get_gpu_ids()[0])

    ray.get(group.ready())
    return ray.get([where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote()
                    for i in range(len(group.bundle_specs))])


class EngineFleet:
    """N engine actors for one run; ``map`` sends rows through them; ``close`` frees them."""

    def __init__(self, run_dir: str, engine: dict, actors: int, options: dict, batch_size: int, threads: int,
                 actor_class: type = EngineActor):
        import ray

        options = dict(options)
        make_group = options.pop("placement", None)  # one placement group per engine
        remote = ray.remote(actor_class)
        self.actors, self.groups = [], []
        self.gpus: dict[str, list[int]] = {}  # node id -> GPU indices the engines hold
        for _ in range(actors):
            placed = make_group() if make_group else {}
            if placed:
                group = placed["scheduling_strategy"].placement_group
                self.groups.append(group)
                self._hold(_bundle_gpus(group))  # the engine's workers will run there, not in the actor
            self.actors.append(remote.options(**options, **placed).remote(run_dir, engine, threads))
        for node, gpus in ray.get([a.ready.remote() for a in self.actors]):  # surface a load error here, once
            self._hold([(node, g) for g in gpus])
        self.batch_size = batch_size

    def _hold(self, gpus) -> None:
        for node, gpu in gpus:
            if gpu not in self.gpus.setdefault(node, []):
                self.gpus[node].append(gpu)

    def map(self, rows: pa.Table, operation: str, params: dict | None = None, on_batch=None):
        """``rows`` through ``operation``, ``batch_size`` rows at a time on whichever engine is free;
        the result keeps the rows' order (a tuple of tables for an operation that gives several).
        Each batch back counts on the running stage's progress line, or goes to ``on_batch(rows)``."""
        from ray.util import ActorPool

        from titok import progress

        batches = [rows.slice(start, self.batch_size) for start in range(0, rows.num_rows, self.batch_size)]
        if not batches:
            return rows
        bar = progress.current() if on_batch is None else None
        if bar is not None:
            bar.start(rows.num_rows)
            on_batch = bar.update
        done = []
        for batch, out in zip(batches, ActorPool(self.actors).map(
                lambda actor, batch: actor.run.remote(operation, batch, params), batches)):
            done.append(out)
            if on_batch is not None:
                on_batch(batch.num_rows)
        if isinstance(done[0], tuple):
            return tuple(pa.concat_tables(parts, promote_options="default") for parts in zip(*done))
        return pa.concat_tables(done, promote_options="default")

    def close(self, shutdown_timeout_s: float = 120.0) -> None:
        """Free the engines (and their placement groups) for the stages after scoring: each engine's own
        shutdown first, then the actor."""
        import ray
        from ray.util import remove_placement_group

        from titok.signals import stopping

        if stopping():  # Ctrl-C or SIGTERM: no graceful shutdown; the session's end frees the processes
            for actor in self.actors:
                ray.kill(actor)
            self.actors, self.groups, self.peak_rss_mib = [], [], None
            return
        try:  # what each engine held at its peak, for the run's record
            self.peak_rss_mib = ray.get([actor.peak_rss_mib.remote() for actor in self.actors], timeout=30)
        except Exception:  # noqa: BLE001 - a dead engine has no peak to report
            self.peak_rss_mib = None
        shutdowns = [actor.shutdown.remote() for actor in self.actors]
        for actor, shutdown in zip(self.actors, shutdowns):
            try:
                ray.get(shutdown, timeout=shutdown_timeout_s)
            except Exception as err:  # noqa: BLE001 - a dead or stuck engine is killed all the same
                print(f"warning: an engine did not shut down cleanly ({type(err).__name__}); killing its actor",
                      flush=True)
        for actor in self.actors:
            ray.kill(actor)
        for group in self.groups:
            remove_placement_group(group)
        self.actors, self.groups = [], []
