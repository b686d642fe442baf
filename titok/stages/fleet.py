"""Source-model engines kept for the queries, labels and scores stages: the model loads once per actor.

Ray Data's ``map_batches`` (and ``ray.data.llm``, which builds on it) starts a fresh actor pool for
every pass, so three stages, and every query-writing round, would load the source model again: for
a 70B source that is minutes and 141 GB read each time. Here N engine actors are started once per
run (``EngineFleet``), each holding the source base and its adapters (an adapter is switched off to
write queries and for the amateur pass), and every stage sends its rows through them (``map``). Ray
Data is not used for this hop because it cannot stream through actors it did not start: forwarding
actors stall as soon as the engines hold every CPU of a node (its executor waits for a free CPU; seen
on the 2-core machine, where one engine with ``cpus_per_actor: 2`` holds both). Stage rows are small (text and per-token arrays) and travel as
Arrow tables.

Rows are handed out as engines free up (self-scheduling, written here because ``ray.util.ActorPool``
neither restarts nor redoes): batches are planned once per pass (``plan_batches``: each at most
``batch_size`` rows and at most the rows left over twice the engine count, so the last rows spread
over every engine instead of queuing behind one long batch), the same batches whatever engine runs them,
so a result does not depend on timing. An engine lost mid-batch (out of memory, a node drained, a
preempted instance) is restarted by Ray (``max_restarts``) and its batch is redone on the first free
engine, logged as ``engine_lost`` (the restarted engine's ``model_load`` says ``restarted``); rows
are neither lost nor doubled. An engine out of restarts stops the pass (``EngineLost``, naming it and
its last error): a run that keeps losing engines is better stopped (a rerun resumes) than left to
drain the cluster. Results depend on the batches, so on the engine count too (sampling draws one
stream per batch); the engine count is not part of a stage's fingerprint, so a stage written with one
count is reused with another.

Placement follows ``engines.placement`` (a placement group per tensor-parallel vLLM engine).
Closing shuts each engine down through its own ``shutdown`` first (vLLM's engine core and its worker
processes, which a killed actor would orphan on the GPU), then kills the actors; ``gpus`` names what
they held, for ``readiness.wait_for_free_gpus``.
"""

from __future__ import annotations

import time

import pyarrow as pa

from titok.runstate import RunDir

__all__ = ["EngineActor", "EngineFleet", "EngineLost", "plan_batches"]


_PROBE_EVERY_S = 0.5  # how often a restarting engine is asked whether it is back


class EngineLost(RuntimeError):
    """An engine actor died more often than ``max_restarts`` allows."""


def plan_batches(rows: int, batch_size: int | None, engines: int) -> list[tuple[int, int]]:
    """(start, length) of each batch of a pass: guided self-scheduling, each batch the rows left over
    twice the engine count (rounded up), at most ``batch_size`` (None: no cap, for engines that batch
    continuously inside a call, vLLM). Every engine gets work at once and batches shrink towards the
    end, so no engine idles while another still has a long queue. Over the engine count once, the tail
    was 1.14x the ideal wall-clock in ``bench/bench_fleet.py``; over twice, 1.04x (106 calls, not 63)."""
    batches, start = [], 0
    while start < rows:
        size = -(-(rows - start) // (2 * max(engines, 1)))
        if batch_size:
            size = min(size, batch_size)
        batches.append((start, size))
        start += size
    return batches


def _death(err: BaseException) -> str:
    """The lines of a RayActorError that say why the actor died (its first, and Ray's exit detail)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = [line for line in lines[1:] if "exit detail" in line.lower() or "killed" in line.lower()]
    return " ".join((lines[:1] + detail[:1]) or [type(err).__name__])[:500]


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
        restarted = ray.get_runtime_context().was_current_actor_reconstructed  # Ray restarted a lost engine
        self.run_dir.log_event(event="model_load", stage="engine", restarted=restarted, model=engine["base"],
                               adapter=engine.get("adapter"),
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

    def __init__(self, run_dir: str, engine: dict, actors: int, options: dict, batch_size: int | None, threads: int,
                 actor_class: type = EngineActor, max_restarts: int = 3):
        import ray

        options = dict(options)
        make_group = options.pop("placement", None)  # one placement group per engine
        # Ray restarts a lost engine (its __init__ loads the model again); the batch it held is redone
        # here, on whichever engine is free, not retried blindly on the restarted one
        remote = ray.remote(actor_class)
        self.actors, self.groups, self.run_dir, self.max_restarts = [], [], run_dir, max_restarts
        self.gpus: dict[str, list[int]] = {}  # node id -> GPU indices the engines hold
        for _ in range(actors):
            placed = make_group() if make_group else {}
            if placed:
                group = placed["scheduling_strategy"].placement_group
                self.groups.append(group)
                self._hold(_bundle_gpus(group))  # the engine's workers will run there, not in the actor
            self.actors.append(remote.options(**options, **placed, max_restarts=max_restarts, max_task_retries=0)
                               .remote(run_dir, engine, threads))
        for node, gpus in ray.get([a.ready.remote() for a in self.actors]):  # surface a load error here, once
            self._hold([(node, g) for g in gpus])
        self.batch_size = batch_size
        self.deaths = [0] * actors

    def _hold(self, gpus) -> None:
        for node, gpu in gpus:
            if gpu not in self.gpus.setdefault(node, []):
                self.gpus[node].append(gpu)

    def map(self, rows: pa.Table, operation: str, params: dict | None = None, on_batch=None):
        """``rows`` through ``operation`` on whichever engine is free (``plan_batches``); the result keeps
        the rows' order (a tuple of tables for an operation that gives several). Each batch back counts
        on the running stage's progress line, or goes to ``on_batch(result)`` (that batch's result, as
        it comes back: a stage that keeps batches as they come loses none to a stop)."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        from titok import columns as C
        from titok import progress

        plan = plan_batches(rows.num_rows, self.batch_size, len(self.actors))
        if not plan:
            return rows
        bar = progress.current() if on_batch is None else None
        if bar is not None:
            bar.start(rows.num_rows)
        todo = list(range(len(plan)))  # batch indices not yet done, in plan order
        done: dict[int, object] = {}
        running: dict = {}  # ref -> ("batch", engine, batch index) | ("probe", engine, None)
        free = list(range(len(self.actors)))
        restarting: dict[int, float] = {}  # engine -> when to ask again whether it is back
        log = RunDir(self.run_dir)

        def batch(i: int) -> pa.Table:
            return rows.slice(*plan[i])

        while len(done) < len(plan):
            for engine, at in list(restarting.items()):
                if at <= time.monotonic():
                    del restarting[engine]
                    running[self.actors[engine].ready.remote()] = ("probe", engine, None)
            while free and todo:
                engine, i = free.pop(0), todo.pop(0)
                running[self.actors[engine].run.remote(operation, batch(i), params)] = ("batch", engine, i)
            if not running:
                time.sleep(_PROBE_EVERY_S)
                continue
            ready, _ = ray.wait(list(running), num_returns=1, timeout=_PROBE_EVERY_S if restarting else None)
            if not ready:
                continue
            kind, engine, i = running.pop(ready[0])
            try:
                out = ray.get(ready[0])
            except RayActorError as err:
                if kind == "probe":
                    if isinstance(err, ActorUnavailableError):  # still restarting (loading its model)
                        restarting[engine] = time.monotonic() + _PROBE_EVERY_S
                        continue
                    raise EngineLost(f"engine {engine} did not restart: {_death(err)}") from None
                # a batch sent to an engine believed alive failed: it died (Ray says "died" when it is
                # gone for good, "unavailable" when it restarts)
                self.deaths[engine] += 1
                todo.insert(0, i)  # first in line for the next free engine
                ids = batch(i).column(C.SAMPLE_ID).to_pylist() if C.SAMPLE_ID in rows.column_names else []
                log.log_event(event="engine_lost", stage=operation, engine=engine, deaths=self.deaths[engine],
                              error=_death(err), redone_rows=plan[i][1], redone_sample_ids=ids[:64])
                if self.deaths[engine] > self.max_restarts:
                    raise EngineLost(f"engine {engine} died {self.deaths[engine]} times, more than "
                                     f"engine.max_restarts={self.max_restarts}; its last error: {_death(err)}") from None
                restarting[engine] = time.monotonic()
                continue
            if kind == "batch":
                done[i] = out
                if bar is not None:
                    bar.update(plan[i][1])
                if on_batch is not None:
                    on_batch(out)
            free.append(engine)  # free again, or back from a restart (its model_load says restarted)
        results = [done[i] for i in range(len(plan))]
        if isinstance(results[0], tuple):
            return tuple(pa.concat_tables(parts, promote_options="default") for parts in zip(*results))
        return pa.concat_tables(results, promote_options="default")

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
