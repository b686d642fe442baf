"""GPU facts that the plan, the vLLM engine and the readiness checks share: the GiB, the token budget
of a vLLM engine step and the LoRA ranks vLLM accepts. They sit here, below all three, so that an
engine or a check never imports the plan (a floor above it)."""

from __future__ import annotations

__all__ = ["GIB", "VLLM_LARGE_GPU_GIB", "VLLM_LORA_RANKS", "vllm_batched_tokens", "vllm_lora_rank"]

GIB = 1024**3
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_LARGE_GPU_GIB = 70  # vLLM batches 16,384 tokens per step on GPUs with at least this memory, else 8,192


def vllm_batched_tokens(setting: int | None, max_length: int, gpu_memory_gib: float | None) -> int:
    """Tokens per vLLM engine step: the setting, else vLLM's default for the GPU (16,384 from 70 GiB,
    8,192 below; the larger where the memory is unknown), at least one whole sequence."""
    if setting:
        return setting
    large = gpu_memory_gib is None or gpu_memory_gib >= VLLM_LARGE_GPU_GIB
    return max(16384 if large else 8192, max_length)


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts for ``max_lora_rank`` that holds ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})")
