"""The names a config may choose among, without the code behind them.

``config.py`` (and with it every ``--help``) reads these; the modules that implement them import
them from here. Keeping them apart from ``loss.py`` (torch) and ``reference.py`` (transformers) is
what lets ``titok --help`` and config validation start in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["DEFAULT_ENGINE", "ENGINES", "FILTER_METHODS", "PAPER_METHOD", "REFERENCES", "STAGES", "TOKEN_SCOPES", "EngineName", "EngineSpec",
           "FilterMethod", "FilterMethodName", "Normalization", "Reference", "TokenScope"]

# the selective loss's normalization (titok.core.loss)
Normalization = Literal["selected_mean", "rho1"]

# whose log-probabilities the excess is measured against (titok.core.reference)
Reference = Literal["source_amateur", "target_base", "both"]
REFERENCES: tuple[str, ...] = Reference.__args__

# where the top-k% token cut is taken (titok.core.select)
TokenScope = Literal["per_sample", "per_batch", "global"]
TOKEN_SCOPES: tuple[str, ...] = TokenScope.__args__

# a transplant's stages, in order (titok.workflows.pipeline; ``titok transplant --until``)
STAGES: tuple[str, ...] = ("queries", "labels", "scores", "filter", "align", "train", "export")


@dataclass(frozen=True)
class FilterMethod:
    """A way to pick training samples and tokens from the scored pool (TiTok, its baselines, ablations);
    ``titok.stages.filtering`` runs it from these two answers, nothing else."""

    description: str
    samples: Literal["top_m", "random", "all"]  # the top-M by mean excess, M at random, or every sample
    token_filter: bool  # the top-k% tokens (so a token reference applies), or every token
    distills: bool = False  # trains on the expert's top-n log-probs too (titok.core.distill's ULD), not its text alone

    @property
    def keeps_m(self) -> bool:
        """Trains on M samples, not the pool (what the plan counts)."""
        return self.samples != "all"

    @property
    def one_pool(self) -> bool:
        """Has a form on one pool held by one worker (a zoo's shared filter pass); random M is Ray
        Data's seeded shuffle, which has none."""
        return self.samples != "random"


# The one list of filter methods: config, plan, the pipeline, the zoo and compare read it here; a new
# method is an entry (if its samples and tokens are picked one of these ways) plus its tests.
FILTER_METHODS: dict[str, FilterMethod] = {
    "titok": FilterMethod("top-M samples + top-k% tokens (the paper)", "top_m", True),
    "kd": FilterMethod("all samples, all tokens (the expert's answers as plain labels)", "all", False),
    "random_m": FilterMethod("M random samples, all tokens", "random", False),
    "top_m_only": FilterMethod("top-M samples, all tokens (the sample filter alone)", "top_m", False),
    "top_k_only": FilterMethod("all samples, top-k% tokens (the token filter alone)", "all", True),
    "uld": FilterMethod("all samples, all tokens, cross-entropy plus logit distillation across tokenizers (ULD on "
                        "the expert's top-n log-probs, paired by character spans)", "all", False, distills=True),
}
FilterMethodName = Literal[tuple(FILTER_METHODS)]
# the default method; its run folder holds the source stages every other method of a run reuses
PAPER_METHOD: FilterMethodName = "titok"


@dataclass(frozen=True)
class EngineSpec:
    """What the rest of titok needs to know of an inference engine (``titok.engines``): how one engine
    spreads over GPUs, how it takes rows, how its GPU memory behaves (the plan's estimate)."""

    description: str
    implementation: str  # "module:Class", imported only when an engine is built (vLLM is GPU-only)
    shards: Literal["device_map", "tensor_parallel"]  # whole layers over the actor's GPUs, or TP x PP workers
    batches_continuously: bool  # takes all the rows it is handed in one call (no rows-per-call cap)
    gpu_memory: Literal["grows", "preallocated"]  # with the batch (weights, KV, logits), or a share taken up front
    # the ``EngineConfig`` fields this engine alone is built with (keyword arguments of its class),
    # beside the common ones (base, adapter, dtype, max_length, batch_size, trust_remote_code)
    settings: tuple[str, ...] = ()


# The one list of engines: config, placement, plan, the pipeline, evaluation and the CLI read it here;
# a new engine is its class (``titok.engines.base.InferenceEngine``), an entry here and its config fields.
ENGINES: dict[str, EngineSpec] = {
    "transformers": EngineSpec("CPU or GPU; a model larger than one GPU is split over the actor's GPUs",
                               "titok.engines.hf:TransformersEngine", "device_map", batches_continuously=False,
                               gpu_memory="grows", settings=("max_batch_tokens",)),
    "vllm": EngineSpec("GPU; continuous batching, adapters as LoRA requests, tensor/pipeline parallel",
                       "titok.engines.vllm_engine:VLLMEngine", "tensor_parallel", batches_continuously=True,
                       gpu_memory="preallocated",
                       settings=("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization",
                                 "max_num_batched_tokens", "max_loras", "max_cpu_loras", "max_lora_rank",
                                 "vllm_score_tolerance")),
}
EngineName = Literal[tuple(ENGINES)]
DEFAULT_ENGINE: EngineName = "transformers"  # the embedded default: runs on any CPU
