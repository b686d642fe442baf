"""``dtype: auto``: one rule for engines, evaluation and training, with its reason."""

from __future__ import annotations

import pytest

from titok import hardware
from titok.hardware import resolve_dtype


def test_a_dtype_set_in_the_config_is_kept():
    assert resolve_dtype("float16", use_gpu=False, training=True) == ("float16", "set in the config")


@pytest.mark.parametrize("instructions,inference", [([], "float32"), (["avx512_bf16"], "bfloat16"), (["amx_bf16"], "bfloat16")])
def test_on_a_cpu_bf16_is_for_inference_with_bf16_instructions_and_training_is_fp32(monkeypatch, instructions, inference):
    monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: instructions)
    dtype, reason = resolve_dtype("auto", use_gpu=False)
    assert dtype == inference and reason.startswith("auto:")
    dtype, reason = resolve_dtype("auto", use_gpu=False, training=True)
    assert dtype == "float32" and "training on a CPU" in reason


def test_a_gpu_run_checked_from_a_process_without_a_gpu_assumes_bf16():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this process sees a GPU")
    assert resolve_dtype("auto", use_gpu=True, training=True)[0] == "bfloat16"
