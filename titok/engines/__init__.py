"""Inference engines for generation and log-prob scoring, behind one small interface.

``transformers`` runs anywhere (the embedded CPU default); ``vllm`` is for GPU clusters and checks its
own prompt log-probs against transformers before it is trusted with scoring.
"""

from __future__ import annotations

from titok.engines.base import GenerationParams, InferenceEngine

__all__ = ["GenerationParams", "InferenceEngine", "build_engine"]


def build_engine(
    name: str,
    base: str,
    adapter: str | None,
    dtype: str = "bfloat16",
    max_length: int = 512,
    batch_size: int = 8,
    trust_remote_code: bool = False,
    vllm_score_tolerance: float = 0.05,
    tensor_parallel_size: int = 1,
) -> InferenceEngine:
    if name == "transformers":
        from titok.engines.hf import TransformersEngine

        return TransformersEngine(base, adapter, dtype, max_length, batch_size, trust_remote_code)
    if name == "vllm":
        from titok.engines.vllm_engine import VLLMEngine

        return VLLMEngine(base, adapter, dtype, max_length, batch_size, trust_remote_code, vllm_score_tolerance,
                          tensor_parallel_size)
    raise ValueError(f"unknown engine {name!r}: expected 'transformers' or 'vllm'")
