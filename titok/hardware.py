"""What the hardware does fast: ``dtype: auto`` resolves here, with the reason, in one place.

bf16 halves weight memory everywhere, but its speed depends on the device: CUDA GPUs with bf16
support run it at full rate; CPUs only with AMX or AVX512-BF16 instructions (measured: bf16 matmul
~4x faster than fp32 on an AMX Xeon, ~1.8x on an AVX512-BF16 EPYC, ~4x *slower* on an AVX2-only
EPYC, where PyTorch emulates it). So ``auto`` is bf16 on those devices and fp32 elsewhere.

Training on a CPU is the exception: a LoRA training step of Gemma-3-270M took 5.6 s in bf16 and
2.0 s in fp32 on the AVX512-BF16 EPYC (its bf16 forward was 3x faster, its backward far slower), so
``auto`` trains in fp32 on every CPU; CPU training is for small models, where fp32 memory is no
concern. On GPUs training follows the same rule as inference.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["cpu_bf16_instructions", "resolve_dtype"]


def cpu_bf16_instructions() -> list[str]:
    """The CPU's bf16 instruction sets that PyTorch uses (``amx_bf16``, ``avx512_bf16``), from
    /proc/cpuinfo (Linux); empty where none or unknown."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags]


def resolve_dtype(requested: str, use_gpu: bool | None = None, training: bool = False) -> tuple[str, str]:
    """``(dtype name, reason)``; ``requested`` other than ``"auto"`` is returned as is.

    ``use_gpu`` None means "whatever this process sees" (CUDA if available); ``training`` asks for
    the dtype of a backward pass, which on a CPU is fp32 (see the module docstring).
    """
    if requested != "auto":
        return requested, "set in the config"
    on_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    if on_gpu:
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bfloat16", f"auto: {torch.cuda.get_device_name()} supports bf16"
        if torch.cuda.is_available():
            return "float32", f"auto: {torch.cuda.get_device_name()} has no bf16 support"
        return "bfloat16", "auto: GPU run (bf16 assumed; no GPU visible to this process to check)"
    instructions = cpu_bf16_instructions()
    capability = torch.backends.cpu.get_cpu_capability()
    if training:
        return "float32", f"auto: training on a CPU (capability {capability}): bf16 backward is slower than fp32"
    if instructions:
        return "bfloat16", f"auto: CPU has {'/'.join(instructions)} (capability {capability})"
    return "float32", f"auto: CPU has no AMX/AVX512-BF16 (capability {capability}): bf16 would be emulated and slower"
