"""The driver waits for the cluster (``titok.readiness``) on a simulated cluster whose nodes carry
fake GPUs: GPU nodes that register late, and engines whose GPU memory outlives them unless they
shut down through their own ``shutdown``. The GPU memory is a stand-in: each engine writes what it
holds per GPU into a ledger folder, and the probe reads a GPU's used memory from there where NVML
would read the device."""

from __future__ import annotations

import functools
import threading
import time
import uuid
from pathlib import Path

import pytest

from titok.config import ConfigError
from titok.readiness import GpuMemoryHeld, gpu_bundles, wait_for_free_gpus, wait_for_resources
from tests.conftest import simulated_gpu_cluster, tiny_transplant_config

pytestmark = pytest.mark.slow

GIB = 1024**3
FAKE_GPU_BYTES = 80 * GIB


@pytest.fixture(scope="module")
def growing_cluster():
    """A CPU head and one node of 8 fake GPUs; a test may add nodes."""
    with simulated_gpu_cluster(gpu_nodes=1, cpus_per_node=8) as cluster:
        yield cluster


class HoldsGpuMemory:
    """Stands where an engine actor stands: on start it holds ``engine["gib"]`` on each GPU Ray gave it
    (a ledger file per GPU), and only its engine's ``shutdown`` gives that back, as vLLM's engine core
    and worker processes keep the GPU after their actor is killed. ``engine["stuck"]``: its shutdown
    leaves the memory held (a worker that does not exit)."""

    def __init__(self, run_dir: str, engine: dict, threads: int):
        import ray

        self.node, self.gpu_ids = ray.get_runtime_context().get_node_id(), [int(g) for g in ray.get_gpu_ids()]
        self.engine = engine
        self.files = [Path(engine["ledger"]) / f"{self.node}-{gpu}-{uuid.uuid4().hex}" for gpu in self.gpu_ids]
        for path in self.files:
            path.write_text(str(int(engine["gib"] * GIB)))

    def ready(self) -> tuple[str, list[int]]:
        return self.node, self.gpu_ids

    def peak_rss_mib(self) -> float:
        return 0.0

    def shutdown(self) -> None:
        if not self.engine.get("stuck"):
            for path in self.files:
                path.unlink()


def ledger_readings(ledger: str, gpus: list[int]) -> list[dict]:
    """What NVML would say on this node: each GPU's memory held by the stand-in engines."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    out = []
    for index in gpus:
        held = [int(p.read_text()) for p in Path(ledger).glob(f"{node}-{index}-*")]
        out.append({"index": index, "total": FAKE_GPU_BYTES, "used": sum(held), "processes": [(4242, b) for b in held]})
    return out


def _fleet(tmp_path, ledger, **engine):
    from titok.engines.placement import actor_options
    from titok.stages.fleet import EngineFleet

    return EngineFleet(str(tmp_path), {"ledger": str(ledger), "gib": 72.0, **engine}, actors=2, batch_size=1, threads=1,
                       options=actor_options("transformers", gpus_per_actor=4, cpus_per_actor=1),
                       actor_class=HoldsGpuMemory)


def test_engines_shut_down_free_their_gpus_before_training_loads(growing_cluster, tmp_path):
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    fleet = _fleet(tmp_path, ledger)
    assert sum(len(g) for g in fleet.gpus.values()) == 8 and len(list(ledger.iterdir())) == 8
    fleet.close()
    probe = functools.partial(ledger_readings, str(ledger))
    readings = wait_for_free_gpus(fleet.gpus, need_bytes=20 * GIB, timeout_s=30, probe=probe, poll_s=0.5)
    assert len(readings) == 8 and all(r.free == FAKE_GPU_BYTES for r in readings)


def test_memory_still_held_stops_the_run_naming_the_gpu_and_what_holds_it(growing_cluster, tmp_path, capsys):
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    fleet = _fleet(tmp_path, ledger, stuck=True)
    fleet.close()
    probe = functools.partial(ledger_readings, str(ledger))
    with pytest.raises(GpuMemoryHeld) as held:
        wait_for_free_gpus(fleet.gpus, need_bytes=20 * GIB, timeout_s=3, probe=probe, poll_s=0.5)
    message = str(held.value)
    assert "8 GPU(s) the engines used still hold memory 3 s after the engines shut down" in message
    assert "GPU 0: 72.0 of 80.0 GiB held (pid 4242 72.0 GiB)" in message and "cluster.gpu_release_timeout_s" in message
    # what the actor's death alone frees is not enough: the memory is still there after the kill
    assert len(list(ledger.iterdir())) == 8


def test_the_driver_waits_for_gpu_nodes_that_register_late(growing_cluster, tmp_path, capsys):
    cfg = tiny_transplant_config({"source": "s", "adapter": "a", "target": "t"}, tmp_path / "run",
                                 "train.use_gpu=true", "train.workers=16", "train.global_batch_size=16",
                                 "filter.top_m=16", "queries.pool_size=16")
    assert gpu_bundles(cfg) == [{"GPU": 1, "CPU": 1}] * 16
    with pytest.raises(ConfigError) as refused:
        wait_for_resources([cfg], timeout_s=3, poll_s=0.5)
    assert "within 3 s (cluster.wait_for_resources_s): needs 16 GPUs (1 on one node at least); registered: 8 GPUs on " \
           "1 node(s)" in str(refused.value)

    outcome = []  # the driver waits in a thread while a node registers (Cluster.add_node wants the main thread)
    waiting = threading.Thread(target=lambda: outcome.append(wait_for_resources([cfg], timeout_s=120, poll_s=0.5)))
    waiting.start()
    time.sleep(3)
    assert waiting.is_alive()
    growing_cluster.add_node(num_cpus=8, num_gpus=8)
    waiting.join(120)
    assert outcome == [None]
    out = capsys.readouterr().out
    assert "[cluster] waiting for GPUs (0 of 120 s): needs 16 GPUs" in out and "[cluster] the GPUs registered after" in out
