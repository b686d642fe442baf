"""Inference engines for generation and log-prob scoring, behind one small interface.

``transformers`` runs anywhere (the embedded CPU default) and splits a model over the GPUs its actor
holds; ``vllm`` is for GPU clusters (tensor/pipeline parallel, multi-LoRA) and checks its prompt
log-probs before it is trusted with scoring. Which class implements an engine, and which config
fields it alone takes, is its entry in ``titok.choices.ENGINES``.
"""

from __future__ import annotations

import importlib

from titok.choices import ENGINES
from titok.engines.base import GenerationParams, InferenceEngine

__all__ = ["GenerationParams", "InferenceEngine", "build_engine"]


def build_engine(
    name: str,
    base: str,
    adapter: str | dict[str, str] | None,
    dtype: str = "auto",
    max_length: int = 512,
    batch_size: int = 8,
    trust_remote_code: bool = False,
    gpus: float = 0.0,
    settings: dict | None = None,
) -> InferenceEngine:
    """An engine over ``base`` (+ ``adapter``). ``gpus``: the GPUs this actor holds (placement has
    made them the visible ones); ``settings``: the engine's own fields (``EngineConfig.engine_settings``)."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}: expected one of {sorted(ENGINES)}")
    module, _, cls = ENGINES[name].implementation.partition(":")
    engine_class = getattr(importlib.import_module(module), cls)
    return engine_class(base, adapter, dtype, max_length, batch_size, trust_remote_code, **(settings or {}))
