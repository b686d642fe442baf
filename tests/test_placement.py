"""Engine placement on a simulated cluster of 2 nodes x 8 (fake) GPUs: tensor-parallel vLLM engines
get their GPUs as one placement group on one node, transformers engines hold theirs on one node,
and no GPU is ever shared."""

from __future__ import annotations

import pytest

from titok.engines.placement import actor_options, engine_bundles
from tests.conftest import simulated_gpu_cluster

pytestmark = pytest.mark.slow


def test_bundles_for_one_engine():
    assert engine_bundles(4, 1) == ([{"GPU": 1, "CPU": 1}] * 4, "STRICT_PACK")
    assert engine_bundles(4, 2) == ([{"GPU": 1, "CPU": 1}] * 8, "PACK")  # pipeline stages may span nodes
    assert actor_options("vllm", 1, 2)["num_gpus"] == 1  # one GPU: the actor holds it itself
    assert set(actor_options("vllm", 4, 2, tensor_parallel_size=4)) == {"num_cpus", "num_gpus", "placement"}
    assert actor_options("transformers", 4, 2) == {"num_cpus": 2, "num_gpus": 4, "scheduling_strategy": "SPREAD"}
    assert actor_options("vllm", 0, 3) == {"num_cpus": 3, "num_gpus": 0, "scheduling_strategy": "SPREAD"}


@pytest.fixture(scope="module")
def gpu_cluster():
    import ray

    with simulated_gpu_cluster(gpu_nodes=2):
        yield ray


class TensorParallelProbe:
    """Stands where a vLLM engine actor stands: vLLM's Ray executor starts one worker per bundle of the
    engine's placement group; here each worker reports its node and the GPU Ray gave it."""

    def __init__(self, run_dir: str, engine: dict, threads: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = ray.util.get_current_placement_group()
        assert group is not None, "a tensor-parallel engine must run inside its own placement group"

        @ray.remote(num_gpus=1, num_cpus=0)
        def worker():
            return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()[0]

        self.gpus = ray.get([worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote()
                             for i in range(engine["tensor_parallel_size"])])

    def ready(self) -> tuple:
        import ray

        return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()  # the actor itself holds no GPU

    def workers(self) -> list:
        return self.gpus

    def peak_rss_mib(self) -> float:
        return 0.0

    def shutdown(self) -> None:
        pass


def test_tensor_parallel_engines_each_get_four_gpus_of_one_node(gpu_cluster, tmp_path):
    import ray

    from titok.stages.fleet import EngineFleet

    fleet = EngineFleet(str(tmp_path), {"tensor_parallel_size": 4}, actors=4, batch_size=1, threads=1,
                        options=actor_options("vllm", gpus_per_actor=4, cpus_per_actor=1, tensor_parallel_size=4),
                        actor_class=TensorParallelProbe)
    try:
        engines = ray.get([actor.workers.remote() for actor in fleet.actors])
        assert len(fleet.groups) == 4  # one placement group per engine
        # the GPUs the fleet records for the memory check after shutdown are the ones vLLM's workers got
        assert sorted((node, int(gpu)) for gpus in engines for node, gpu in gpus) == \
            sorted((node, gpu) for node, gpus in fleet.gpus.items() for gpu in gpus)
        for gpus in engines:
            assert len({node for node, _ in gpus}) == 1  # tensor parallelism stays on one node
            assert len({gpu for _, gpu in gpus}) == 4
        used = [pair for gpus in engines for pair in gpus]
        assert len(used) == len(set(used)) == 16  # all 16 GPUs in use, none shared
    finally:
        fleet.close()
    assert ray.util.placement_group_table() and all(
        g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())


def test_transformers_engines_hold_their_gpus_on_one_node(gpu_cluster, tiny_model_dirs, tmp_path):
    from titok.runstate import RunDir
    from titok.stages.fleet import EngineFleet

    engine = {"name": "transformers", "base": tiny_model_dirs["source"], "adapter": tiny_model_dirs["adapter"],
              "dtype": "float32", "max_length": 128, "batch_size": 2}
    fleet = EngineFleet(str(tmp_path), engine, actors=4, options=actor_options("transformers", 4, 1), batch_size=2, threads=1)
    try:
        loads = [e for e in RunDir(tmp_path).events() if e["event"] == "model_load"]
        assert len(loads) == 4
        used = [(e["node_id"], gpu) for e in loads for gpu in e["gpu_ids"]]
        assert all(len(e["gpu_ids"]) == 4 for e in loads)
        assert len(used) == len(set(used)) == 16
    finally:
        fleet.close()
