"""Where engine actors run: Ray resources for one actor, and one placement group per tensor-parallel
vLLM engine.

- CPU engines and engines that fit the actor's own GPUs (transformers with ``device_map`` over
  them, or a single-GPU vLLM engine) reserve ``num_gpus`` on the actor: Ray gives an actor all its
  GPUs on one node, and distinct actors never share a GPU.
- A vLLM engine with TP x PP > 1 runs its workers through vLLM's Ray executor, as Ray's own
  ``ray.data.llm`` does: the actor itself takes no GPU, and a placement group of TP x PP bundles
  ``{"GPU": 1, "CPU": 1}`` is created for it (the actor itself runs in it, on one bundle's CPU), ``STRICT_PACK`` (one node) when it is tensor parallel
  only, ``PACK`` when pipeline stages may span nodes. vLLM places its workers in that group
  (``placement_group_capture_child_tasks``), so each engine's GPUs are its own.
"""

from __future__ import annotations

__all__ = ["actor_options", "engine_bundles"]


def engine_bundles(tensor_parallel_size: int, pipeline_parallel_size: int) -> tuple[list[dict], str]:
    """Placement-group bundles and strategy for one multi-GPU vLLM engine."""
    strategy = "STRICT_PACK" if pipeline_parallel_size == 1 else "PACK"
    return [{"GPU": 1, "CPU": 1} for _ in range(tensor_parallel_size * pipeline_parallel_size)], strategy


def _placement_group_strategy(bundles: list[dict], strategy: str) -> dict:
    """Called once per engine actor, so every engine gets a group of its own."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = ray.util.placement_group(bundles, strategy=strategy)
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)}


def actor_options(name: str, gpus_per_actor: float, cpus_per_actor: int, tensor_parallel_size: int = 1,
                  pipeline_parallel_size: int = 1) -> dict:
    """Ray resources for one engine actor (``.options`` keyword arguments). For a multi-GPU vLLM
    engine, ``"placement"`` is a function that makes the engine's placement group and returns the
    scheduling strategy to start the actor with."""
    from functools import partial

    from titok.choices import ENGINES

    parallel = tensor_parallel_size * pipeline_parallel_size
    if ENGINES[name].shards == "tensor_parallel" and gpus_per_actor > 0 and parallel > 1:
        bundles, strategy = engine_bundles(tensor_parallel_size, pipeline_parallel_size)
        return {"num_cpus": 1, "num_gpus": 0, "placement": partial(_placement_group_strategy, bundles, strategy)}
    return {"num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor, "scheduling_strategy": "SPREAD"}
