"""Before a stage takes GPUs: the cluster has registered them, and the last stage has let go of them.

- ``wait_for_resources``: a job submitted to an autoscaling cluster (KubeRay, slow pods) starts before
  its GPU workers have registered, so the plan would be checked against a cluster that is still
  growing and refused. The driver asks the autoscaler for the GPUs of the largest stage
  (``request_resources``), waits (bounded, with progress) until Ray reports them, and only then plans.
- ``wait_for_free_gpus``: Ray frees an engine's GPUs in its books the moment the actor dies, but a
  vLLM engine's worker processes may still hold ~72 GiB per GPU when the training group starts to
  load the target. After the engines shut down, the driver reads each GPU they held (NVML, in a task
  on its node) until it has the memory the next stage needs, else stops naming the node, the GPU,
  the memory still held and the processes holding it.

Written by hand: Ray tracks GPUs as counts, not memory, and nothing in Ray or vLLM waits for either.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field

from titok.config import ConfigError
from titok.gpu_facts import GIB

__all__ = ["GpuMemoryHeld", "GpuReading", "gpu_bundles", "nvml_readings", "wait_for_free_gpus", "wait_for_resources"]

PROGRESS_EVERY_S = 30.0


# ---------------------------------------------------------------- the GPUs a run needs

def gpu_bundles(cfg) -> list[dict]:
    """The GPU bundles of the stage that holds the most GPUs at once (engines, the target-side
    reference, training): what the cluster must have before the plan can be checked."""
    e, t, f = cfg.engine, cfg.train, cfg.filter
    stages = []
    if e.gpus_per_actor:
        stages.append([{"GPU": e.gpus_per_actor, "CPU": e.cpus_per_actor}] * e.actors)
    if t.use_gpu:
        stages.append([{"GPU": 1, "CPU": t.cpus_per_worker}] * t.workers)
        if f.token_reference != "source_amateur":
            stages.append([{"GPU": f.reference_gpus, "CPU": t.cpus_per_worker}])
    return max(stages, key=lambda bundles: sum(b["GPU"] for b in bundles), default=[])


def _registered_gpus() -> list[tuple[str, float]]:
    """(node IP, GPUs) of every alive GPU node (what Ray reports now)."""
    import ray

    return sorted((n["NodeManagerAddress"], n["Resources"]["GPU"]) for n in ray.nodes()
                  if n.get("Alive") and n["Resources"].get("GPU", 0.0) > 0)


def _missing(bundles: list[dict], nodes: list[tuple[str, float]]) -> str | None:
    need, largest = sum(b["GPU"] for b in bundles), max((b["GPU"] for b in bundles), default=0)
    have, biggest = sum(n for _, n in nodes), max((n for _, n in nodes), default=0)
    if have >= need and biggest >= largest:
        return None
    return (f"needs {need:g} GPUs ({largest:g} on one node at least); registered: {have:g} GPUs on {len(nodes)} node(s)"
            + (f" ({', '.join(f'{ip}: {n:g}' for ip, n in nodes)})" if nodes else ""))


def wait_for_resources(configs: list, timeout_s: float | None = None, poll_s: float = 2.0, log=print) -> None:
    """Until the GPUs of the largest stage of any of ``configs`` have registered (asking the autoscaler
    for them meanwhile); ``ConfigError`` naming what is missing after ``timeout_s``. By default only a
    driver that joined a cluster (``RAY_ADDRESS``: ``ray job submit``, a RayJob) waits, for
    ``cluster.wait_for_resources_s``; a local Ray will not grow, so its plan is checked at once."""
    from ray.autoscaler.sdk import request_resources

    if timeout_s is None:
        timeout_s = max((c.cluster.wait_for_resources_s for c in configs), default=0.0) if os.environ.get("RAY_ADDRESS") \
            else 0.0
    bundles = max((gpu_bundles(c) for c in configs), key=lambda b: sum(x["GPU"] for x in b), default=[])
    missing = _missing(bundles, _registered_gpus()) if bundles and timeout_s > 0 else None
    if missing is None:
        return
    request_resources(bundles=[{k: math.ceil(v) for k, v in b.items()} for b in bundles])
    started, last = time.monotonic(), -PROGRESS_EVERY_S
    try:
        while missing is not None:
            waited = time.monotonic() - started
            if waited >= timeout_s:
                raise ConfigError(f"the cluster did not register the GPUs this run needs within {timeout_s:g} s "
                                  f"(cluster.wait_for_resources_s): {missing}. Add GPU nodes (or let the autoscaler "
                                  "add them), or lower engine.actors / train.workers")
            if waited - last >= PROGRESS_EVERY_S:
                log(f"[cluster] waiting for GPUs ({waited:.0f} of {timeout_s:g} s): {missing}", flush=True)
                last = waited
            time.sleep(poll_s)
            missing = _missing(bundles, _registered_gpus())
        log(f"[cluster] the GPUs registered after {time.monotonic() - started:.0f} s", flush=True)
    finally:
        request_resources(bundles=[])  # the run's own actors hold the nodes from here; never pin the cluster's size


# ---------------------------------------------------------------- memory the engines leave behind

@dataclass
class GpuReading:
    """One GPU as its node's driver sees it (NVML): memory in bytes and the processes holding it."""

    node_ip: str
    index: int
    total: int
    used: int
    processes: list = field(default_factory=list)  # [(pid, bytes)]

    @property
    def free(self) -> int:
        return self.total - self.used

    def describe(self) -> str:
        holders = ", ".join(f"pid {pid} {used / GIB:.1f} GiB" for pid, used in self.processes) or "no process listed"
        return f"node {self.node_ip} GPU {self.index}: {self.used / GIB:.1f} of {self.total / GIB:.1f} GiB held ({holders})"


def nvml_readings(gpus: list[int]) -> list[dict]:
    """Memory of this node's GPUs ``gpus`` from NVML (which sees every process on the GPU, whatever
    CUDA_VISIBLE_DEVICES says); runs in a task on the node."""
    try:
        import pynvml
    except ImportError:  # Ray ships its own copy for the dashboard
        import ray._private.thirdparty.pynvml as pynvml

    pynvml.nvmlInit()
    try:
        out = []
        for index in gpus:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            processes = [(p.pid, p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
            out.append({"index": index, "total": int(memory.total), "used": int(memory.used), "processes": processes})
        return out
    finally:
        pynvml.nvmlShutdown()


@functools.cache
def _probe_task():
    """One remote function for every poll (Ray registers each new one)."""
    import ray

    return ray.remote(num_cpus=0)(lambda probe, gpus: probe(gpus))


def _read(held: dict[str, list[int]], probe) -> list[GpuReading]:
    """``held``: {node id: GPU indices}; one zero-CPU task per node reads them there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    refs = {node: _probe_task().options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(probe, gpus)
            for node, gpus in held.items() if node in ips}
    return [GpuReading(ips[node], r["index"], r["total"], r["used"], [tuple(p) for p in r["processes"]])
            for node, ref in refs.items() for r in ray.get(ref, timeout=60)]


class GpuMemoryHeld(RuntimeError):
    """GPUs an earlier stage used still hold the memory the next stage needs."""


def wait_for_free_gpus(held: dict[str, list[int]], need_bytes: int, timeout_s: float, probe=nvml_readings,
                       poll_s: float = 2.0, log=print) -> list[GpuReading]:
    """Until every GPU in ``held`` ({node id: indices}) has ``need_bytes`` free; the last readings.
    ``GpuMemoryHeld`` naming each GPU still short after ``timeout_s``."""
    if not held or timeout_s <= 0:
        return []
    started, last = time.monotonic(), -PROGRESS_EVERY_S
    while True:
        readings = _read(held, probe)
        short = [r for r in readings if r.free < need_bytes]
        waited = time.monotonic() - started
        if not short:
            if waited >= poll_s:
                log(f"[cluster] the engines' GPUs are free after {waited:.0f} s", flush=True)
            return readings
        if waited >= timeout_s:
            raise GpuMemoryHeld(
                f"{len(short)} GPU(s) the engines used still hold memory {timeout_s:g} s after the engines shut down "
                f"(cluster.gpu_release_timeout_s), and the next stage needs {need_bytes / GIB:.1f} GiB free on each: "
                + "; ".join(r.describe() for r in short)
                + ". Stop those processes (or raise the timeout); the finished stages are kept and a rerun resumes")
        if waited - last >= PROGRESS_EVERY_S:
            log(f"[cluster] waiting for the engines' GPUs to be freed ({waited:.0f} of {timeout_s:g} s): "
                + "; ".join(r.describe() for r in short), flush=True)
            last = waited
        time.sleep(poll_s)
