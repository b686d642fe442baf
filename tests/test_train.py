"""Target training on Ray Train + DeepSpeed (CPU, gloo) with a tiny Llama over the real SmolLM2
tokenizer: ZeRO-3 loads partitioned and trains the same adapter as ZeRO-2; the global batch fixes
the recipe whatever the worker count; a worker killed mid-run resumes from its checkpoint and ends
with the adapter an uninterrupted run ends with. Plus the pure batching arithmetic."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from titok import columns as C
from titok.config import TrainConfig
from titok.hardware import cpu_bf16_instructions
from titok.runstate import RunDir
from titok.core.sequences import encode_response
from titok.tasks import load_task, reference_response
from titok.train.batching import epoch_order, plan_batches, worker_micro_batches
from titok.train.job import TrainingJob
from titok.train.ray_train import copy_adapter, group_jobs, run_training, train_adapter
from titok.train.strategy import DEEPSPEED_CONFIG_DIR
from tests.conftest import real_tokenizer, tiny_llama


# ---------- batching: pure ----------

def test_micro_batch_is_the_largest_divisor_within_the_cap():
    plan = plan_batches(rows=20, global_batch=12, workers=2, max_micro_batch=4, epochs=3)
    assert (plan.micro_batch, plan.accumulation, plan.per_worker) == (3, 2, 6)
    assert plan.steps_per_epoch == 2 and plan.total_steps == 6
    assert plan_batches(20, 12, 2, 4, 3, max_steps=5).total_steps == 5


@pytest.mark.parametrize("rows,global_batch,workers,match", [(20, 6, 4, "not a multiple"), (5, 8, 2, "larger than the 5")])
def test_impossible_batch_plans_are_refused(rows, global_batch, workers, match):
    with pytest.raises(ValueError, match=match):
        plan_batches(rows, global_batch, workers, 4, 1)


@pytest.mark.parametrize("rows,global_batch", [(10, 4), (12, 4), (7, 7)])
def test_epoch_order_visits_every_row_and_pads_to_whole_steps(rows, global_batch):
    order = epoch_order(rows, seed=3, epoch=1, global_batch=global_batch)
    assert len(order) % global_batch == 0 and set(order) == set(range(rows))
    assert len(order) - rows < global_batch
    assert list(order) == list(epoch_order(rows, 3, 1, global_batch))
    assert list(order) != list(epoch_order(rows, 3, 2, global_batch))


def test_the_same_micro_batches_whatever_the_worker_count():
    order = epoch_order(22, seed=0, epoch=0, global_batch=8)
    for step in range(3):
        one = worker_micro_batches(order, plan_batches(22, 8, 1, 4, 1), step, rank=0)
        two = [mb for rank in range(2) for mb in worker_micro_batches(order, plan_batches(22, 8, 2, 4, 1), step, rank)]
        four = [mb for rank in range(4) for mb in worker_micro_batches(order, plan_batches(22, 8, 4, 4, 1), step, rank)]
        assert [list(m) for m in one] == [list(m) for m in two]
        assert sorted(np.concatenate(four)) == sorted(order[step * 8 : step * 8 + 8])


# ---------- Ray Train + DeepSpeed ----------

def test_a_checkpoint_holds_no_frozen_tensor_even_a_tied_one(tmp_path, monkeypatch):
    """The tiny Llama ties its LM head to its embedding, as Gemma does: DeepSpeed alone saved that
    frozen tensor under its second name in every checkpoint (672 MB for Gemma-3-270M)."""
    import socket

    import torch.distributed as dist

    from titok.train import strategy
    from titok.train.step import attach_fresh_lora

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("LOCAL_RANK", "0")  # what a launcher sets; DeepSpeed asks for it
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = attach_fresh_lora(tiny_llama(real_tokenizer("smollm2-135m")), rank=4)
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
        config = strategy.deepspeed_config(2, micro_batch=1, accumulation=1, max_grad_norm=1.0, bf16=False)
        engine = strategy.build_engine(model, config, 1e-3, 0.0, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
        strategy.save_state(engine, tmp_path, {"step": 3})
        saved = torch.load(tmp_path / "deepspeed" / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
        assert set(saved) == trainable and all("lora_" in n for n in saved)
        assert strategy.load_state(engine, tmp_path) == {"step": 3}  # and it resumes without them
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    tokenizer = real_tokenizer("smollm2-135m")
    path = tmp_path_factory.mktemp("tiny-target")
    tiny_llama(tokenizer, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _rows(n: int = 12) -> list[dict]:
    tokenizer = real_tokenizer("smollm2-135m")
    rng = np.random.default_rng(0)
    rows = []
    for i, example in enumerate(load_task("boolean_expressions", seed=0).train_examples[:n]):
        response = reference_response(example)
        n_tokens = len(encode_response(tokenizer, response)[0])
        rows.append({C.SAMPLE_ID: i, C.QUERY: example["input"], C.RESPONSE: response,
                     C.TARGET_WEIGHTS: rng.uniform(0.2, 1.0, n_tokens).astype(np.float32)})
    return rows


def _job(target_dir, run_dir, **train_fields) -> TrainingJob:
    fields = {"workers": 2, "epochs": 2, "global_batch_size": 4, "micro_batch_size": 2, "lr": 5e-3, "dtype": "float32",
              "lora": {"rank": 4, "alpha": 8, "dropout": 0.1}, **train_fields}
    train = TrainConfig(**{k: v for k, v in fields.items() if not k.startswith("fault")})
    job = TrainingJob.of(train, target_dir, seed=0, run_dir=str(run_dir), max_length=160, k=0.7)
    return dataclasses.replace(job, **{k: v for k, v in fields.items() if k.startswith("fault")})


def _train(local_ray, target_dir, run_dir, **train_fields) -> dict:
    config = _job(target_dir, run_dir, **train_fields)
    outcome = train_adapter(local_ray.data.from_items(_rows()), config, storage_path=str(run_dir / "ray"))
    adapter = copy_adapter(outcome, run_dir / "adapter")
    return {"weights": load_file(adapter / "adapter_model.safetensors"), "metrics": outcome.metrics,
            "events": RunDir(run_dir).events()}


@pytest.fixture(scope="module")
def zero2_two_workers(target_dir, tmp_path_factory):
    import ray

    from tests.conftest import start_local_ray

    start_local_ray()
    return _train(ray, target_dir, tmp_path_factory.mktemp("zero2-w2"))


def _assert_same_adapter(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def test_training_runs_under_nccls_device_rule(zero2_two_workers):
    """Every worker's loop ran under ``device_rules`` (conftest sets TITOK_GPU_RULES): titok's
    collectives and DeepSpeed's got only tensors on the training device. A loss all-reduced as
    ``torch.tensor(loss)``, made on the host, fails every worker here as NCCL fails it on a GPU."""
    checks = [e for e in zero2_two_workers["events"] if e["event"] == "gpu_rules"]
    assert sorted(e["rank"] for e in checks) == [0, 1]
    # per optimizer step: one finiteness flag per micro-step and one mean loss, at least
    assert all(e["collectives_checked"]["all_reduce"] >= 2 * zero2_two_workers["metrics"]["optimizer_steps"]
               for e in checks)


@pytest.mark.slow
def test_zero3_with_gradient_checkpointing_trains_what_zero2_trains_without_it(zero2_two_workers, target_dir, tmp_path,
                                                                               local_ray):
    """The 70B recipe's combination (ZeRO-3, PEFT, non-reentrant checkpointing), forced on for a
    tiny model that ``auto`` would not checkpoint; every parameter partitioned (no persistence
    threshold), the frozen norms too: a recompute that saw them as their empty shards is the
    DeepSpeed bug (deepspeedai/DeepSpeed#4332) that breaks this combination in older releases.
    ZeRO-3 without checkpointing is the killed-worker test's (it ends as the same adapter)."""
    config = json.loads((DEEPSPEED_CONFIG_DIR / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3-all-partitioned.json").write_text(json.dumps(config))
    zero3 = _train(local_ray, target_dir, tmp_path, deepspeed_stage=3, gradient_checkpointing=True,
                   deepspeed_config=str(tmp_path / "zero3-all-partitioned.json"))
    loads = [e for e in zero3["events"] if e["event"] == "model_load"]
    assert len(loads) == 2 and {e["rank"] for e in loads} == {0, 1}
    assert all(e["partitioned"] and e["gradient_checkpointing"] and e["local_numel"] == 0 and e["params"] > 0
               for e in loads)  # built partitioned: no rank ever held the whole target
    assert not any(e["partitioned"] for e in zero2_two_workers["events"] if e["event"] == "model_load")
    _assert_same_adapter(zero3["weights"], zero2_two_workers["weights"], atol=1e-5)
    lora_b = [v for k, v in zero3["weights"].items() if "lora_B" in k]
    assert any(v.abs().max() > 1e-3 for v in lora_b)  # it trained away from the zero init
    assert np.isfinite(zero3["metrics"]["loss"]) and zero3["metrics"]["optimizer_steps"] == 6


@pytest.mark.slow
def test_a_worker_killed_under_zero3_resumes_to_the_uninterrupted_adapter(zero2_two_workers, target_dir, tmp_path,
                                                                           local_ray):
    """ZeRO-3 partitions the LoRA and its optimizer state too: each rank restores its own shard."""
    marker = tmp_path / "fault.txt"
    resumed = _train(local_ray, target_dir, tmp_path, deepspeed_stage=3, checkpoint_every_steps=2, fault_at_step=3,
                     fault_marker=str(marker))
    assert marker.is_file()
    resumes = [e for e in resumed["events"] if e["event"] == "train_resumed"]
    assert {e["step"] for e in resumes} == {2} and len(resumes) == 2
    assert all(e["partitioned"] for e in resumed["events"] if e["event"] == "model_load")
    _assert_same_adapter(resumed["weights"], zero2_two_workers["weights"], atol=1e-5)


BF16_LOSS_RTOL = 0.02  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding, a few percent over a forward pass


@pytest.mark.slow
@pytest.mark.skipif(not cpu_bf16_instructions(), reason="this CPU has no AMX/AVX512-BF16: PyTorch would emulate bf16 "
                    f"(capability {torch.backends.cpu.get_cpu_capability()}), too slow to train in")
def test_a_bf16_base_under_zero3_trains_and_exports_an_adapter_stock_peft_loads(zero2_two_workers, target_dir, tmp_path,
                                                                                 local_ray):
    """A bf16 target built under zero.Init, where DeepSpeed skips its own dtype cast: the LoRA is
    in the dtype titok gives it, the losses follow fp32's, and the adapter loads in stock PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bf16 = _train(local_ray, target_dir, tmp_path, deepspeed_stage=3, gradient_checkpointing=True, dtype="bfloat16")
    fp32 = zero2_two_workers["metrics"]
    print(f"first loss bf16 {bf16['metrics']['first_loss']:.5f} fp32 {fp32['first_loss']:.5f}; "
          f"final bf16 {bf16['metrics']['loss']:.5f} fp32 {fp32['loss']:.5f}")
    assert bf16["metrics"]["first_loss"] == pytest.approx(fp32["first_loss"], rel=BF16_LOSS_RTOL)
    assert bf16["metrics"]["loss"] == pytest.approx(fp32["loss"], rel=BF16_LOSS_RTOL)
    # PEFT keeps a LoRA on a bf16 base in fp32, and under zero.Init DeepSpeed leaves it there
    assert {str(d) for e in bf16["events"] if e["event"] == "train_done" for d in e["lora_dtypes"]} == {"torch.float32"}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in bf16["weights"].values())
    assert any(v.abs().max() > 1e-3 for k, v in bf16["weights"].items() if "lora_B" in k)

    base = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(bf16["weights"]) and all(torch.isfinite(p).all() for p in loaded.values())


@pytest.mark.slow
def test_one_or_two_workers_train_the_same_adapter_at_one_global_batch(zero2_two_workers, target_dir, tmp_path, local_ray):
    one = _train(local_ray, target_dir, tmp_path, workers=1)
    assert (one["metrics"]["micro_batch"], one["metrics"]["accumulation"]) == (2, 2)
    assert (zero2_two_workers["metrics"]["micro_batch"], zero2_two_workers["metrics"]["accumulation"]) == (2, 1)
    _assert_same_adapter(one["weights"], zero2_two_workers["weights"], atol=1e-5)
    assert one["metrics"]["loss"] == pytest.approx(zero2_two_workers["metrics"]["loss"], abs=1e-5)


@pytest.mark.slow
def test_a_worker_killed_mid_training_resumes_from_its_checkpoint(zero2_two_workers, target_dir, tmp_path, local_ray):
    marker = tmp_path / "fault.txt"
    resumed = _train(local_ray, target_dir, tmp_path, checkpoint_every_steps=2, fault_at_step=3, fault_marker=str(marker))
    assert marker.is_file()  # the fault really fired
    resumes = [e for e in resumed["events"] if e["event"] == "train_resumed"]
    assert {e["step"] for e in resumes} == {2} and len(resumes) == 2  # both ranks, from the step-2 checkpoint
    assert len([e for e in resumed["events"] if e["event"] == "model_load"]) == 4  # the group was rebuilt once
    _assert_same_adapter(resumed["weights"], zero2_two_workers["weights"], atol=1e-5)


@pytest.mark.slow
def test_a_resubmitted_run_goes_on_from_its_last_checkpoint(zero2_two_workers, target_dir, tmp_path, local_ray):
    """The job dies (no retries left); the same training started again on the same storage resumes."""
    marker = tmp_path / "fault.txt"
    with pytest.raises(Exception):
        _train(local_ray, target_dir, tmp_path, checkpoint_every_steps=2, max_failures=0, fault_at_step=3,
               fault_marker=str(marker))
    assert marker.is_file()
    again = _train(local_ray, target_dir, tmp_path, checkpoint_every_steps=2)
    assert {e["step"] for e in again["events"] if e["event"] == "train_resumed"} == {2}
    _assert_same_adapter(again["weights"], zero2_two_workers["weights"], atol=1e-5)


@pytest.mark.slow
def test_one_worker_group_trains_several_adapters_each_as_if_alone(zero2_two_workers, target_dir, tmp_path, local_ray):
    """A zoo's trainings share one worker group and one loaded target: a diverging job fails alone,
    once (the group's two restarts are for crashes, not for a loss that would diverge again), and
    the job after it trains exactly the adapter it trains on a fresh group (nothing of the diverged
    LoRA, its optimizer or its engine is left on the base)."""
    jobs = {"diverges": (local_ray.data.from_items(_rows()), _job(target_dir, tmp_path / "diverges", lr=1e30)),
            "fine": (local_ray.data.from_items(_rows()), _job(target_dir, tmp_path / "fine"))}
    assert group_jobs({n: c for n, (_, c) in jobs.items()}) == [["diverges", "fine"]]
    outcomes = run_training(jobs, storage_path=str(tmp_path / "ray"), log_dir=str(tmp_path))
    assert isinstance(outcomes["diverges"].error, FloatingPointError) and "non-finite" in str(outcomes["diverges"].error)
    assert jobs["diverges"][1].group.max_failures == 2
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        copy_adapter(outcomes["diverges"], tmp_path / "never")
    weights = load_file(copy_adapter(outcomes["fine"], tmp_path / "adapter") / "adapter_model.safetensors")
    _assert_same_adapter(weights, zero2_two_workers["weights"], atol=1e-5)
    loads = [e for e in RunDir(tmp_path).events() if e["event"] == "model_load"]
    assert len(loads) == 2 and all(e["adapters"] == ["diverges", "fine"] for e in loads)  # one load per worker

    # called again, a finished job is not trained again and a failed one is retried
    again = run_training(jobs, storage_path=str(tmp_path / "ray"), log_dir=str(tmp_path))
    assert again["fine"].adapter_dir == outcomes["fine"].adapter_dir and again["diverges"].error is not None
    retried = [e for e in RunDir(tmp_path).events() if e["event"] == "model_load"][2:]
    assert len(retried) == 2 and all(e["adapters"] == ["diverges"] for e in retried)


def test_jobs_share_a_worker_group_only_when_target_and_worker_settings_agree(target_dir, tmp_path):
    configs = {"a": _job(target_dir, tmp_path), "b": _job(target_dir, tmp_path, lr=1e-3, epochs=1),
               "c": _job(target_dir, tmp_path, workers=1), "d": _job(target_dir, tmp_path),
               "z3a": _job(target_dir, tmp_path, deepspeed_stage=3), "z3b": _job(target_dir, tmp_path, deepspeed_stage=3)}
    assert group_jobs(configs) == [["a", "b", "d"], ["c"], ["z3a"], ["z3b"]]  # recipes may differ, workers may not
    assert group_jobs(configs, groups_at_once=2) == [["a", "d"], ["b"], ["c"], ["z3a"], ["z3b"]]


# ---------- learning rate chosen on held-out synthetic samples ----------

LR_SEARCH = {"validation_fraction": 0.25, "lr_search": [1e-6, 5e-3, 1e30]}  # 3 of the 12 rows held out


@pytest.fixture(scope="module")
def lr_search_zero2(target_dir, tmp_path_factory):
    import ray

    from tests.conftest import start_local_ray

    start_local_ray()
    run_dir = tmp_path_factory.mktemp("lr-search-zero2")
    job = _job(target_dir, run_dir, **LR_SEARCH)
    outcome = run_training({"default": (ray.data.from_items(_rows()), job)}, storage_path=str(run_dir / "ray"),
                           log_dir=str(run_dir))["default"]
    return outcome, RunDir(run_dir).events(), run_dir


@pytest.mark.slow
def test_an_lr_search_keeps_the_rate_with_the_lowest_held_out_loss(lr_search_zero2, target_dir):
    """Three rates train in one worker group (one target load) on the same 9 rows; the one that
    diverges cannot win, and the held-out loss the workers report is the kept adapter's loss on exactly
    the held-out rows, recomputed here outside Ray."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from titok.core.sequences import build_training_batch
    from titok.core.validation_split import validation_mask
    from titok.core.validation_split import answer_counts, answers_spread
    from titok.train.step import TorchEngine, held_out_answers, validation_loss

    outcome, events, run_dir = lr_search_zero2
    assert outcome.error is None, outcome.error
    curves = outcome.lr_search
    assert curves[1e30] == [] and len(curves[1e-6]) == len(curves[5e-3]) == 2  # one value per epoch
    assert outcome.metrics["lr"] == 5e-3 and outcome.val_losses == curves[5e-3]
    assert curves[5e-3][-1] < curves[1e-6][-1] - 0.1  # it learned; 1e-6 barely moved
    assert outcome.metrics["train_rows"] == 9 and outcome.metrics["val_loss"] == curves[5e-3][-1]
    loads = [e for e in events if e["event"] == "model_load"]
    assert len(loads) == 2 and all(e["adapters"] == ["default@lr1e-06", "default@lr0.005", "default@lr1e+30"]
                                   for e in loads)

    tokenizer = real_tokenizer("smollm2-135m")
    held_out = [r for r, held in zip(_rows(), validation_mask(12, LR_SEARCH["validation_fraction"], seed=0)) if held]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(target_dir), str(outcome.adapter_dir))
    batches = [build_training_batch(tokenizer, [r[C.QUERY] for r in held_out[i : i + 2]],
                                    [r[C.RESPONSE] for r in held_out[i : i + 2]],
                                    [r[C.TARGET_WEIGHTS] for r in held_out[i : i + 2]], max_length=160)
               for i in range(0, len(held_out), 2)]
    assert validation_loss(TorchEngine(model, None), batches) == pytest.approx(outcome.val_losses[-1], rel=1e-5)

    # every rate that finished answered the 3 held-out queries (timed apart from the steps on both ranks);
    # the kept adapter's share, generated again here
    assert outcome.answers_end[1e30] is None and outcome.metrics["val_answers_checked"] == 3
    done = [e["seconds"]["answers"] for e in events if e["event"] == "train_done"]
    assert sorted(seconds > 0 for seconds in done) == [False] * 2 + [True] * 4
    assert {lr: outcome.answers_end[lr] for lr in (1e-6, 5e-3)} == {lr: json.loads(
        (run_dir / "ray" / "train-outcomes" / f"default@lr{lr:g}" / "result.json").read_text())["metrics"]["val_answers_end"]
        for lr in (1e-6, 5e-3)}
    answers = held_out_answers(TorchEngine(model, None), tokenizer, [r[C.QUERY] for r in held_out],
                               [len(r[C.TARGET_WEIGHTS]) for r in held_out], batch_size=2)
    assert outcome.metrics["val_answers_end"] == sum(e for e, _ in answers) / 3 == outcome.answers_end[5e-3]
    # ... and how its answers spread against the expert's (the ranks' counts summed): the same again here
    spread = answers_spread(*answer_counts([text for _, text in answers], [r[C.RESPONSE] for r in held_out]))
    assert outcome.answers_spread[5e-3] == spread and outcome.answers_spread[1e30] is None
    assert outcome.metrics["val_answers_top_share"] == spread["share"] and outcome.metrics["val_answers_collapsed"] is spread["collapsed"]


@pytest.mark.slow
@pytest.mark.parametrize("stage, gather", [(2, "auto"), (3, "auto"), (3, "never")])
def test_a_rate_kept_without_the_answers_check_is_checked_not_trained_again(lr_search_zero2, target_dir, tmp_path,
                                                                             stage, gather):
    """A kept rate whose record has no held-out answers check (kept by an older titok, or while
    validation_generations was 0) only answers the held-out queries on a rerun: its LoRA loaded, no
    step taken, the share and spread it had when trained, its adapter files byte for byte; a rate kept with its
    share and one that diverged are left as they are. Under ZeRO-3 too, where the LoRA is loaded
    before DeepSpeed partitions it, and both ways ZeRO-3 answers: the base gathered once on each rank,
    which answers its share (the tiny target fits), or gathered at every decode step, every rank
    answering all the queries in step (a 70B target; train.gather_base_for_answers=never)."""
    import ray

    outcome, _, run_dir = lr_search_zero2
    kept = tmp_path / "lr-rates"
    for lr in LR_SEARCH["lr_search"]:
        (kept / f"lr{lr:g}").parent.mkdir(exist_ok=True)
        shutil.copytree(run_dir / "ray" / "train-outcomes" / f"default@lr{lr:g}", kept / f"lr{lr:g}")
    record = kept / "lr0.005" / "result.json"
    result = json.loads(record.read_text())
    shares = {k: result["metrics"].pop(k) for k in ("val_answers_end", "val_answers_checked", "val_answers_top",
                                                     "val_answers_top_share", "val_expert_top_share", "val_answers_collapsed")}
    record.write_text(json.dumps(result))
    weights = (kept / "lr0.005" / "adapter_model.safetensors").read_bytes()

    rerun = tmp_path / "rerun"
    job = dataclasses.replace(_job(target_dir, rerun, deepspeed_stage=stage, gather_base_for_answers=gather, **LR_SEARCH),
                              kept_rates_dir=str(kept))
    again = run_training({"default": (ray.data.from_items(_rows()), job)}, storage_path=str(rerun / "ray"),
                         log_dir=str(rerun))["default"]
    events = RunDir(rerun).events()
    gathered_once, in_step = stage == 3 and gather == "auto", stage == 3 and gather == "never"
    assert sorted((e["queries"], e["base_gathered_once"], e["in_step"]) for e in events if e["event"] == "held_out_answers") \
        == ([(3, False, True)] * 2 if in_step else [(1, gathered_once, False), (2, gathered_once, False)])
    assert [e["adapters"] for e in events if e["event"] == "model_load"] == [["default@lr0.005:check"]] * 2
    done = [e for e in events if e["event"] == "train_done"]
    assert len(done) == 2 and all(e["checked_only"] and e["seconds"]["answers"] > 0 for e in done)
    # the LoRA that answered is the kept one: it scores the held-out rows as recorded when it was trained
    assert all(e["val_loss"] == pytest.approx(outcome.lr_search[5e-3][-1], rel=1e-5) == e["recorded_val_loss"]
               for e in done)
    assert again.metrics["lr"] == 5e-3 and again.answers_end == outcome.answers_end
    assert again.answers_spread == outcome.answers_spread
    assert {k: json.loads(record.read_text())["metrics"][k] for k in shares} == shares
    assert (kept / "lr0.005" / "adapter_model.safetensors").read_bytes() == weights
    assert load_file(again.adapter_dir / "adapter_model.safetensors").keys() == load_file(
        outcome.adapter_dir / "adapter_model.safetensors").keys()
