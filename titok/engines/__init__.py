"""Inference engines for generation and log-prob scoring, behind one small interface.

``transformers`` runs anywhere (the embedded CPU default) and splits a model over the GPUs its actor
holds; ``vllm`` is for GPU clusters (tensor/pipeline parallel, multi-LoRA) and checks its prompt
log-probs before it is trusted with scoring.
"""

from __future__ import annotations

from titok.engines.base import GenerationParams, InferenceEngine

__all__ = ["GenerationParams", "InferenceEngine", "build_engine"]


def build_engine(
    name: str,
    base: str,
    adapter: str | None,
    dtype: str = "auto",
    max_length: int = 512,
    batch_size: int = 8,
    trust_remote_code: bool = False,
    gpus: float = 0.0,
    vllm: dict | None = None,
    max_batch_tokens: int | None = None,
) -> InferenceEngine:
    """An engine over ``base`` (+ ``adapter``). ``gpus``: the GPUs this actor holds (the transformers
    engine splits the model over them); ``vllm``: vLLM's settings (``EngineConfig``'s vLLM fields)."""
    if name == "transformers":
        from titok.engines.hf import TransformersEngine

        return TransformersEngine(base, adapter, dtype, max_length, batch_size, trust_remote_code, max_batch_tokens)
    if name == "vllm":
        from titok.engines.vllm_engine import VLLMEngine

        return VLLMEngine(base, adapter, dtype, max_length, batch_size, trust_remote_code, **(vllm or {}))
    raise ValueError(f"unknown engine {name!r}: expected 'transformers' or 'vllm'")
