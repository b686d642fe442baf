"""``titok plan`` from configs alone: parameter counts against the published sizes, model states
against DeepSpeed's own estimator, fits and refusals with their numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from titok.config import load_config
from titok.model_shape import model_shape
from titok.gpu_facts import vllm_lora_rank
from titok.workflows.plan import Assumptions, Resources, make_plan, zero_model_states

CONFIGS = Path(__file__).parent / "assets" / "configs"
LLAMA_8B, LLAMA_70B, QWEN_72B = (str(CONFIGS / n) for n in ("llama-3.1-8b-instruct", "llama-3.3-70b-instruct", "qwen2.5-72b-instruct"))
TWO_NODES_80GB = Resources(nodes=2, gpus_per_node=8, gpu_memory_gib=80, host_memory_gib=1800)


@pytest.mark.parametrize("path,published", [(LLAMA_8B, 8.03e9), (LLAMA_70B, 70.55e9), (QWEN_72B, 72.71e9)])
def test_parameter_counts_are_within_half_a_percent_of_the_published_sizes(path, published):
    assert model_shape(path).params == pytest.approx(published, rel=0.005)


def test_shape_details_of_llama_70b():
    shape = model_shape(LLAMA_70B)
    assert (shape.layers, shape.hidden, shape.kv_heads, shape.head_dim, shape.vocab) == (80, 8192, 8, 128, 128256)
    assert shape.kv_bytes_per_token() == 320 * 1024  # 80 layers x K,V x 8 heads x 128 x bf16
    assert shape.largest_module_params == 128256 * 8192  # the embedding (and the untied lm_head)
    assert shape.lora_params(8, ["q_proj", "v_proj"]) == 80 * 8 * ((8192 + 8192) + (8192 + 1024))
    assert shape.lora_targets_missing(["q_proj", "c_attn"]) == ["c_attn"]


@pytest.mark.parametrize("offload_optimizer,offload_params", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("gpus_per_node,nodes", [(8, 1), (8, 2), (4, 4)])
def test_zero3_model_states_equal_deepspeeds_estimate_when_everything_trains(offload_optimizer, offload_params, gpus_per_node, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shape = model_shape(LLAMA_70B)
    ours = zero_model_states(0, shape.params, shape.largest_module_params, gpus_per_node, nodes, stage=3,
                             offload_optimizer=offload_optimizer, offload_params=offload_params)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(shape.params, shape.largest_module_params, gpus_per_node, nodes,
                                                        cpu_offload=offload_optimizer, cpu_offload_params=offload_params,
                                                        zero_init=True)
    assert ours == pytest.approx((gpu, cpu), abs=2)


@pytest.mark.parametrize("offload", [False, True])
def test_zero2_gpu_model_states_equal_deepspeeds_estimate_when_everything_trains(offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params = model_shape(LLAMA_8B).params
    ours_gpu, _ = zero_model_states(0, params, 0, 8, 2, stage=2, offload_optimizer=offload)
    _, gpu = estimate_zero2_model_states_mem_needs(params, 8, 2, cpu_offload=offload)
    assert ours_gpu == pytest.approx(gpu, abs=2)


def test_lora_keeps_only_the_adapters_states_per_gpu():
    shape = model_shape(LLAMA_70B)
    lora = shape.lora_params(16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    gpu, _ = zero_model_states(shape.params, lora, shape.largest_module_params, 8, 2, stage=3)
    assert gpu == 4 * shape.largest_module_params + (2 * shape.params + 18 * lora) // 16
    assert 12e9 < gpu < 14e9  # 8.8 GB shard + 4.2 GB gather buffers + 0.2 GB LoRA states


@pytest.mark.parametrize("rank,expected", [(1, 1), (4, 8), (8, 8), (12, 16), (24, 32), (300, 320)])
def test_vllm_lora_rank_rounds_up_to_an_accepted_rank(rank, expected):
    assert vllm_lora_rank(rank) == expected


def _cfg(**sections):
    fields = {"source_base": LLAMA_8B, "source_adapter": "unused", "target_base": LLAMA_70B, "task": "boolean_expressions",
              "engine": {"name": "vllm", "actors": 4, "gpus_per_actor": 4, "tensor_parallel_size": 4, "max_length": 2048},
              "queries": {"pool_size": 500, "max_new_tokens": 128}, "labels": {"max_new_tokens": 512},
              "filter": {"top_m": 250},
              "train": {"use_gpu": True, "workers": 16, "deepspeed_stage": 3, "global_batch_size": 16, "micro_batch_size": 1,
                        "gradient_checkpointing": True, "epochs": 2, "lora": {"rank": 16}}}
    for section, values in sections.items():
        fields[section] = {**fields.get(section, {}), **values} if isinstance(values, dict) else values
    return load_config(**fields)


def test_the_70b_recipe_fits_two_nodes_of_eight_80gb_gpus():
    plan = make_plan(_cfg(), TWO_NODES_80GB)
    assert plan.fits, plan.problems()
    engine, train = plan.stages
    assert engine.gpu["weights"] == model_shape(LLAMA_8B).params * 2 // 4
    assert sum(train.gpu.values()) < 80 * 2**30
    assert train.compute_s > 0 and train.gpu_hours > 0 and engine.flops > 0
    table = plan.table()
    assert "| train |" in table and "KV cache:" in table and "DOES NOT FIT" not in table


def test_training_memory_matches_the_published_70b_arithmetic():
    # ../shared/SCALE.md: ~31 GB per GPU at 16 GPUs, micro-batch 4, 1024 tokens, with checkpointing
    cfg = _cfg(engine={"max_length": 1024}, labels={"max_new_tokens": 1023},
               train={"micro_batch_size": 4, "global_batch_size": 64})
    train = make_plan(cfg, TWO_NODES_80GB).stages[1]
    assert 13e9 < train.gpu["model states"] < 14e9  # 8.8 GB shard + 4.2 GB gather buffers + LoRA states
    assert 6e9 < train.gpu["activations"] < 8e9  # 4 x ~1.7 GB
    assert 25e9 < sum(train.gpu.values()) < 36e9


def test_training_that_cannot_fit_is_refused_with_numbers_and_a_setting_that_fits():
    plan = make_plan(_cfg(train={"deepspeed_stage": 2, "gradient_checkpointing": False, "workers": 8, "global_batch_size": 16,
                                 "micro_batch_size": 2}), TWO_NODES_80GB)
    assert not plan.fits
    problem = plan.problems()[0]
    assert problem.startswith("train: needs") and "the GPUs have 80 GiB" in problem
    suggestion = plan.stages[1].suggestions[0]
    assert "train.gradient_checkpointing=true" in suggestion and "train.deepspeed_stage=3" in suggestion
    fixed = {k.split("=")[0].removeprefix("train."): v for k, v in (s.split("=") for s in suggestion.split("  (")[0].split("--set ")[1:])}
    values = {k: (v.strip() == "true" if v.strip() in ("true", "false") else int(v)) for k, v in fixed.items()}
    assert make_plan(_cfg(train={"deepspeed_stage": 2, "gradient_checkpointing": False, "workers": 8, "global_batch_size": 16,
                                 "micro_batch_size": 2, **values}), TWO_NODES_80GB).stages[1].fits


def test_an_engine_that_cannot_hold_a_sequence_is_refused_and_a_larger_tp_suggested():
    cfg = _cfg(source_base=LLAMA_70B, engine={"tensor_parallel_size": 1, "gpus_per_actor": 1, "actors": 8})
    plan = make_plan(cfg, TWO_NODES_80GB)
    engine = plan.stages[0]
    assert not engine.fits and "KV tokens" in engine.problems[0]
    # TP 2 holds the weights (65.7 GiB) but not with 16,384 batched tokens' logits (7.8 GiB, whole on every rank)
    assert engine.suggestions == ["--set engine.tensor_parallel_size=4 --set engine.gpus_per_actor=4 --set engine.actors=4"]
    suggested = make_plan(_cfg(source_base=LLAMA_70B, engine={"tensor_parallel_size": 4, "gpus_per_actor": 4, "actors": 4}),
                          TWO_NODES_80GB)
    assert suggested.stages[0].fits
    assert not make_plan(_cfg(source_base=LLAMA_70B, engine={"tensor_parallel_size": 2, "gpus_per_actor": 2, "actors": 8}),
                         TWO_NODES_80GB).stages[0].fits


def test_more_gpus_than_the_cluster_has_is_refused():
    plan = make_plan(_cfg(engine={"actors": 8}), Resources(nodes=1, gpus_per_node=8, gpu_memory_gib=80, host_memory_gib=1000))
    assert any("need 32 GPUs; the cluster has 8" in p for p in plan.problems())
    plan = make_plan(_cfg(engine={"tensor_parallel_size": 8, "gpus_per_actor": 8, "actors": 1}),
                     Resources(nodes=4, gpus_per_node=4, gpu_memory_gib=80, host_memory_gib=1000))
    assert any("more than the 4 GPUs of one node" in p for p in plan.problems())


@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    ({"engine": {"gpus_per_actor": 1}}, "engine.gpus_per_actor=1: this machine has no GPU"),  # before the plan now
    ({"target_base": "70b-with-weights"}, "of host RAM per node"),
])
def test_transplant_refuses_a_plan_that_cannot_fit_before_any_model_loads(tiny_model_dirs, tmp_path, local_ray, override, message):
    import shutil

    import torch
    from safetensors.torch import save_file

    from titok.config import ConfigError
    from titok.workflows.pipeline import transplant
    from tests.conftest import tiny_transplant_config

    if override.get("target_base") == "70b-with-weights":
        # the published 70B config beside a tokenizer and a readable safetensors file: the inputs pass
        # their checks (which read weight headers, not 140 GB), so only the plan can refuse it
        folder = tmp_path / "llama-70b"
        shutil.copytree(tiny_model_dirs["source"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
        shutil.copy(Path(LLAMA_70B) / "config.json", folder / "config.json")
        save_file({"lm_head.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
        override = {"target_base": str(folder)}
    cfg = tiny_transplant_config(tiny_model_dirs, tmp_path / "run")
    cfg = cfg.model_copy(update={k: (cfg.engine.model_copy(update=v) if k == "engine" else v) for k, v in override.items()})
    with pytest.raises(ConfigError, match=message) as refused:
        transplant(cfg)
    assert "does not fit the cluster" in str(refused.value) or "this machine has no GPU" in str(refused.value)
    assert not (tmp_path / "run").exists()  # nothing written, no model loaded


def test_dry_run_prints_the_plan_and_computes_nothing(tiny_model_dirs, tmp_path, capsys):
    import yaml

    from titok.cli import main
    from tests.conftest import tiny_transplant_config

    cfg = tiny_transplant_config(tiny_model_dirs, tmp_path / "run")
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    main(["transplant", "--config", str(path), "--dry-run"])
    out = capsys.readouterr().out
    assert "| train |" in out and "dry run: the config is valid and its plan fits" in out
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as refused:
        main(["transplant", "--config", str(path), "--dry-run", "--set", "engine.gpus_per_actor=2"])
    assert refused.value.code == 2 and "has no GPU" in capsys.readouterr().err


def test_plan_command_for_a_cluster_given_on_the_command_line(tmp_path, capsys):
    import json

    import yaml

    from titok.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_cfg().model_dump()))
    main(["plan", "--config", str(path), "--nodes", "2", "--gpus-per-node", "8", "--gpu-memory-gib", "80",
          "--host-memory-gib", "1800", "--json", str(tmp_path / "plan.json")])
    assert "resources (command line): 2 node(s) x 8 GPU(s) (80 GiB)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["fits"] and [s["stage"] for s in saved["stages"]] == ["engine: queries, labels, scores", "train"]
    with pytest.raises(SystemExit) as refused:
        main(["plan", "--config", str(path), "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gib", "24"])
    assert refused.value.code == 1 and "DOES NOT FIT" in capsys.readouterr().out


@pytest.mark.parametrize("field, spec, why", [
    ("target_base", "titok-test/no-such-model", "not reachable on the Hugging Face hub and not in its cache"),
    ("source_base", "<empty folder>", "the folder has no readable config.json"),
])
def test_a_model_whose_config_cannot_be_read_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, field, spec, why):
    """No hub (offline here, as on a cluster without egress): one line naming the field and the model
    and how to point at a local config.json, exit 2; not transformers' traceback."""
    import yaml

    from titok.cli import main

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    if spec == "<empty folder>":
        spec = str(tmp_path / "empty")
        Path(spec).mkdir()
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**_cfg().model_dump(), field: spec}))
    with pytest.raises(SystemExit) as refused:
        main(["plan", "--config", str(path), "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gib", "80"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"titok: {field}: cannot read the config of {spec!r} ({why})")
    assert f"--set {field}=/path/to/folder" in err


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_on_cpu(tmp_path):
    """bench/gpu_check.py runs once where a GPU is lent; its --dry-run (gloo, CPU, toy widths of the
    same shapes, every part of the same code) keeps it working until then."""
    import json
    import subprocess
    import sys

    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(CONFIGS.parents[2] / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["machine"]["cpu_capability"]
    collectives, zero3, scorer = result["collectives"], result["zero3"], result["scorer"]
    assert collectives["ok"] and collectives["all_ranks_finite"] == [True, False] and collectives["host_tensor_refused"]
    assert zero3["ok"] and zero3["partitioned_at_load"] and zero3["losses_finite"] and len(zero3["losses"]) == 3
    assert zero3["save_load_state_round_trip"] and zero3["stock_peft_loads_adapter"] and zero3["plan_total_gib"] > 0
    assert scorer["ok"] and scorer["response_tokens_per_s"] > 0


# ---------- the 70B path's arithmetic, by hand ----------

def test_training_activations_use_train_max_length_not_the_engines():
    train = make_plan(_cfg(train={"max_length": 1024}), TWO_NODES_80GB).stage("train")
    # checkpointing: each layer's input kept (80 x 8192 x 2 bytes per token) plus one layer recomputed
    per_token = 80 * 8192 * 2 + (7 * 8192 + 4 * 28672) * 2
    assert train.gpu["activations"] == 1 * 1024 * per_token
    assert make_plan(_cfg(), TWO_NODES_80GB).stage("train").gpu["activations"] == 2048 * per_token


@pytest.mark.parametrize("gpu_gib,setting,tokens", [(80, None, 16384), (141, None, 16384), (48, None, 8192),
                                                    (80, 4096, 4096)])
def test_the_vllm_batch_the_plan_counts_is_the_one_the_engine_is_given(gpu_gib, setting, tokens):
    from titok.engines.vllm_engine import vllm_engine_args

    cfg = _cfg(engine={"max_num_batched_tokens": setting})
    engine = make_plan(cfg, Resources(nodes=2, gpus_per_node=8, gpu_memory_gib=gpu_gib, host_memory_gib=1800)).stages[0]
    vocab, hidden, tp = 128256, 4096, 4
    # prompt log-prob logits in fp32, whole on every TP rank (vLLM gathers them); layer activations sharded
    assert engine.gpu["activations"] == tokens * vocab * 4 + tokens * 8 * hidden * 2 // tp
    e = cfg.engine
    args = vllm_engine_args(LLAMA_8B, "bfloat16", e.max_length, False, 8, e.tensor_parallel_size,
                            max_num_batched_tokens=e.max_num_batched_tokens, gpu_memory_gib=gpu_gib - 0.9)  # as measured
    assert args["max_num_batched_tokens"] == tokens


def test_zero3_gathers_are_in_the_training_time():
    shape = model_shape(LLAMA_70B)
    base_bytes = shape.params * 2  # bf16
    # 250 samples x 2 epochs over 16 workers x micro-batch 1: 32 micro-steps per GPU; checkpointing: 3 gathers each
    across = make_plan(_cfg(), TWO_NODES_80GB).stage("train")
    assert across.comm_s == pytest.approx(32 * 3 * base_bytes * 15 / 16 / 25e9, rel=1e-9)
    assert 8 * 60 < across.comm_s < 9 * 60  # minutes, not the 45 s of compute
    assert across.load_s == pytest.approx(base_bytes / 2e9 + base_bytes / 25e9)  # rank 0 reads alone, then broadcasts
    assert "on one node (--set train.workers=8) the gathers stay on NVLink" in "\n".join(across.notes)
    one_node = make_plan(_cfg(train={"workers": 8}), TWO_NODES_80GB).stage("train")
    assert one_node.comm_s == pytest.approx(63 * 3 * base_bytes * 7 / 8 / 300e9, rel=1e-9)  # 500 / 8 -> 63 micro-steps
    no_ckpt = make_plan(_cfg(train={"workers": 8, "gradient_checkpointing": False}), TWO_NODES_80GB).stage("train")
    assert no_ckpt.comm_s == pytest.approx(one_node.comm_s * 2 / 3)
    assert make_plan(_cfg(train={"deepspeed_stage": 2, "workers": 8}), TWO_NODES_80GB).stage("train").comm_s == 0


def test_an_lr_search_costs_one_training_per_rate_on_the_samples_not_held_out():
    one = make_plan(_cfg(), TWO_NODES_80GB).stage("train")
    search = make_plan(_cfg(train={"validation_fraction": 0.1, "lr_search": [3e-4, 1e-3, 3e-3]}),
                       TWO_NODES_80GB).stage("train")
    # 25 of the 250 samples held out; each rate's LoRA then answers them, up to 2 x 512 + 16 new tokens
    params = model_shape(LLAMA_70B).params
    answers = 2 * params * 3 * 25 * (Assumptions().prompt_tokens + 1040)
    assert search.flops == pytest.approx(one.flops * 3 * 225 / 250 + answers)
    # ZeRO-3: each rate loads (and broadcasts) the 70B target again, and each of the 3 x 1040 decode steps of
    # those answers gathers the whole base across the two nodes
    assert search.load_s == pytest.approx(3 * one.load_s)
    training = 85 * 3 * params * 2 * 15 / 16 / 25e9  # 3 rates x 225 samples over 16 GPUs: 85 micro-steps, 3 gathers each
    assert search.comm_s == pytest.approx(training + 3 * 1040 * params * 2 * 15 / 16 / 25e9, rel=1e-9)
    notes = "\n".join(search.notes)
    assert "x 3 learning rates" in notes and "25 samples held out for validation" in notes
    assert "held-out answers (train.validation_generations): 25 per rate, up to 1040 new tokens each" in notes
    assert "decode steps gathers the whole base" in notes  # 140 GB in bf16 does not fit an 80 GB GPU
    unchecked = make_plan(_cfg(train={"validation_fraction": 0.1, "lr_search": [3e-4, 1e-3, 3e-3],
                                      "validation_generations": 0}), TWO_NODES_80GB).stage("train")
    assert unchecked.flops == pytest.approx(one.flops * 3 * 225 / 250)


def test_a_target_that_fits_beside_training_is_gathered_once_per_rate_for_the_held_out_answers():
    """An 8B target (16 GB in bf16) fits in half of what ZeRO-3 training leaves of an 80 GB GPU: each rate
    gathers it once for its held-out answers, not at each of its 1,040 decode steps; unless told never to."""
    def plan(**train):
        return make_plan(_cfg(target_base=LLAMA_8B, train={"validation_fraction": 0.1, "lr_search": [3e-4, 1e-3, 3e-3],
                                                           **train}), TWO_NODES_80GB).stage("train")

    unchecked, once, per_step = plan(validation_generations=0), plan(), plan(gather_base_for_answers="never")
    gather = model_shape(LLAMA_8B).params * 2 * 15 / 16 / 25e9  # the whole base to each of 16 GPUs over the network
    assert once.comm_s == pytest.approx(unchecked.comm_s + 3 * gather, rel=1e-9)
    assert per_step.comm_s == pytest.approx(unchecked.comm_s + 3 * 1040 * gather, rel=1e-9)
    assert "each rate gathers the whole base (15.0 GiB) once for them" in "\n".join(once.notes)


def test_a_refused_trainings_suggestion_is_checked_in_full():
    """1 node x 8 GPUs with train.workers=16: memory alone would accept checkpointing, which cannot run."""
    one_node = Resources(nodes=1, gpus_per_node=8, gpu_memory_gib=80, host_memory_gib=1800)
    cfg = _cfg(train={"workers": 16, "gradient_checkpointing": False})
    train = make_plan(cfg, one_node).stage("train")
    assert any("train.workers=16 (one GPU each) but the cluster has 8 GPUs" in p for p in train.problems)
    suggestion = train.suggestions[0]
    assert "--set train.workers=8" in suggestion
    values = {k.removeprefix("train."): yaml_value(v) for k, v in
              (x.strip().split("=") for x in suggestion.split("  (")[0].split("--set ")[1:])}
    assert make_plan(_cfg(train={"workers": 16, "gradient_checkpointing": False, **values}), one_node).stage("train").fits


def yaml_value(text: str):
    import yaml

    return yaml.safe_load(text)


def test_the_align_stage_with_a_target_side_reference_is_planned():
    """filter.reference=target_base loads the whole 70B target for a forward pass: 141 GB in bf16
    does not fit one 80 GB GPU, so it is refused with the smallest split that fits."""
    shape = model_shape(LLAMA_70B)
    cfg = _cfg(filter={"reference": "target_base"}, engine={"dtype": "bfloat16"})
    plan = make_plan(cfg, TWO_NODES_80GB)
    align = plan.stage("align")
    work = 8 * 2048 * (8192 + 28672) * 2 + 8 * 513 * 128256 * (2 + 8)  # activations + logits of 8 kept samples
    assert align.gpu == {"weights": shape.params * 2, "activations": 8 * 2048 * (8192 + 28672) * 2,
                         "logits": 8 * 513 * 128256 * (2 + 8)}
    assert not plan.fits and "the target base whole on 1 GPU(s)" in align.problems[0]
    needed = next(n for n in range(1, 9) if shape.params * 2 // n + work + 2 * 2**30 <= 80 * 2**30)
    assert needed == 2 and align.suggestions == ["--set filter.reference_gpus=2"]
    fixed = make_plan(_cfg(filter={"reference": "target_base", "reference_gpus": 2}, engine={"dtype": "bfloat16"}),
                      TWO_NODES_80GB)
    assert fixed.stage("align").fits and fixed.stage("align").gpu["weights"] == shape.params * 2 // 2
    assert [s.stage for s in make_plan(_cfg(), TWO_NODES_80GB).stages] == ["engine: queries, labels, scores", "train"]
