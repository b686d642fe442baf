"""Target-LoRA training on Ray Train: the worker function and the trainer around it.

One Ray Train run trains one adapter or several (a zoo's): each worker builds the target once
(partitioned as it loads under ZeRO-3, see ``strategy``) and then, job after job, attaches a fresh
LoRA, runs ``step.training_step`` on its micro-batches of each global batch (``batching``) with
that job's recipe, and unloads the LoRA again. Starting a worker group and loading the target cost
more than training a small adapter, so a zoo pays them once per worker group, not once per adapter.
Jobs (``train.job.TrainingJob``) share a group only when their ``WorkerGroup`` (the target and the
worker settings) is the same and they do not use ZeRO-3 (its hooks bind the base to one DeepSpeed engine).
Every worker reads all the (few hundred) selected samples of a job from its dataset and picks its
rows itself, so the rows of step s never depend on how many workers run it.

Checkpoints (every ``train.checkpoint_every_steps`` optimizer steps and at the end of each epoch)
carry the LoRA, optimizer and scheduler partitions, the step and which jobs are done, so after a
worker dies Ray Train restarts the group (``FailureConfig``) and ``get_checkpoint()`` resumes the
job it was on, mid-epoch at the exact rows. Dropout is seeded per micro-batch, so a resumed run
equals an uninterrupted one. A non-finite loss is not retried (it would recur): all ranks stop that
job at the same micro-step and go on with the next. Rank 0 writes each finished job's adapter (a
PEFT folder) and metrics, or its failure, under ``<storage_path>/<name>-outcomes/<job>/``, which
the driver reads back (``TrainOutcome``); like Ray Train's checkpoints this needs storage every node
sees.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from titok import columns as C, progress
from titok.runstate import ADAPTER_FILES
from titok.train.job import TrainingJob, WorkerGroup

__all__ = ["GRADIENT_CHECKPOINTING_MIN_PARAMS", "TrainOutcome", "copy_adapter",
           "group_jobs", "run_training", "train_adapter", "train_loop_per_worker"]


# gradient_checkpointing "auto": on from this target size (activations dominate memory beyond it)
GRADIENT_CHECKPOINTING_MIN_PARAMS = 1_000_000_000

_PROGRESS = "progress.json"  # in every checkpoint: the run's attempt, finished jobs, the job in progress


@dataclass
class TrainOutcome:
    """One job's result: its adapter folder and final metrics, or the error that ended it."""

    name: str
    adapter_dir: Path | None = None
    metrics: dict = field(default_factory=dict)
    error: BaseException | None = None
    val_losses: list[float] = field(default_factory=list)  # after each epoch, with train.validation_fraction
    lr_search: dict[float, list[float]] = field(default_factory=dict)  # each tried rate's val_losses ([]: diverged)
    answers_end: dict[float, float | None] = field(default_factory=dict)  # each tried rate's val_answers_end
    answers_spread: dict[float, dict | None] = field(default_factory=dict)  # ... and how its answers spread


def _linear_warmup_decay(total_steps: int, warmup: int):
    return lambda step: min((step + 1) / max(warmup, 1), max(0.0, (total_steps - step) / max(total_steps - warmup, 1)))


def _micro_batch_seed(seed: int, global_step: int, plan, rank: int, j: int) -> int:
    """Same micro-batch -> same seed, whichever worker runs it (1 worker x 2 == 2 workers x 1)."""
    micro_per_step = plan.global_batch // plan.micro_batch
    return seed * 1_000_003 + global_step * micro_per_step + rank * plan.accumulation + j


def _job_plan(job: TrainingJob, n_rows: int, world: int):
    """The batch plan of a job's ``n_rows`` samples, less those it holds out for validation."""
    from titok.train.batching import train_plan

    return train_plan(n_rows, job.train, world)


def _split_validation(job: TrainingJob, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(training rows, held-out rows)``: the same seeded draw on every worker (rows come sorted by id)."""
    from titok.core.validation_split import validation_mask

    held_out = validation_mask(len(rows), job.train.validation_fraction, job.seed)
    return [r for r, h in zip(rows, held_out) if not h], [r for r, h in zip(rows, held_out) if h]


def _job_deepspeed_config(job: TrainingJob, plan, bf16: bool) -> dict:
    from titok.train import strategy

    group = job.group
    return strategy.deepspeed_config(group.deepspeed_stage, plan.micro_batch, plan.accumulation, job.train.max_grad_norm,
                                     bf16, group.offload_optimizer, group.offload_params, group.deepspeed_config)


def _read_progress(attempt: str):
    """From the checkpoint Ray Train hands a (re)started group: the progress record to go on from
    (finished jobs; failed ones only if they failed in this same attempt, since a divergence would
    recur, while a resubmitted run retries them) and the checkpoint of the job it was on."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    progress = {}
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            path = Path(directory, _PROGRESS)
            progress = json.loads(path.read_text()) if path.is_file() else {}
    same_attempt = progress.get("attempt") == attempt
    return {"attempt": attempt, "done": list(progress.get("done", [])),
            "failed": list(progress.get("failed", [])) if same_attempt else [], "job": progress.get("job")}, checkpoint


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's ``train_func``: runs on every worker; trains ``config["jobs"]`` (``{name: TrainingJob}``,
    all of ``config["group"]``) one after another
    (under NCCL's device rule, checked on CPU, where ``TITOK_GPU_RULES=1``: ``device_rules``)."""
    from titok.train import device_rules

    if not device_rules.enabled():
        return _train_jobs(config)
    import ray.train

    from titok.runstate import RunDir

    with device_rules.host_tensors_refused() as checked:
        _train_jobs(config)
    RunDir(config["log_dir"]).log_event(event="gpu_rules", stage="train", rank=ray.train.get_context().get_world_rank(),
                                        collectives_checked=dict(checked))


def _train_jobs(config: dict) -> None:
    import ray.train

    from titok.hardware import resolve_dtype
    from titok.models import load_tokenizer
    from titok.runstate import RunDir
    from titok.train import strategy

    group: WorkerGroup = config["group"]  # what every job of the group shares
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    progress, checkpoint = _read_progress(config["attempt"])
    resume_job = progress["job"]
    jobs = {name: job for name, job in config["jobs"].items() if name not in progress["done"] + progress["failed"]}
    if not jobs:
        return
    rows = {name: sorted(ray.train.get_dataset_shard(name).iter_rows(), key=lambda r: r[C.SAMPLE_ID]) for name in jobs}

    dtype, dtype_reason = resolve_dtype(group.dtype, group.use_gpu, training=True)
    first = next(iter(jobs))
    load_config = _job_deepspeed_config(jobs[first], _job_plan(jobs[first], len(rows[first]), world), dtype == "bfloat16")
    tokenizer = load_tokenizer(group.target_base, group.trust_remote_code)
    base, _zero3 = strategy.load_target(group.target_base, getattr(torch, dtype), load_config, group.trust_remote_code)
    n_params = sum(strategy.whole_numel(p) for p in base.parameters())
    checkpointing = group.gradient_checkpointing
    if checkpointing == "auto":
        checkpointing = n_params >= GRADIENT_CHECKPOINTING_MIN_PARAMS
    RunDir(config["log_dir"]).log_event(
        event="model_load", stage="train", rank=rank, node_id=ray.get_runtime_context().get_node_id(),
        dtype=[dtype, dtype_reason], zero_stage=group.deepspeed_stage,
        partitioned=all(strategy.is_partitioned(p) for p in base.parameters()),
        local_numel=sum(p.numel() for p in base.parameters()), params=n_params, gradient_checkpointing=checkpointing,
        adapters=list(jobs))

    for name, job in jobs.items():
        resume_from = checkpoint if name == resume_job else None
        outcome = Path(config["outcomes"]) / name
        if job.check_adapter:
            base = _check_kept_rate(base, tokenizer, name, job, rows[name], progress, outcome, dtype, rank, world,
                                    config.get("progress_feed"))
            continue
        base = _train_job(base, tokenizer, name, job, rows[name], progress, outcome, resume_from, dtype, checkpointing,
                          rank, world, config.get("progress_feed"))


def _train_job(base, tokenizer, name: str, job: TrainingJob, rows: list[dict], progress: dict, outcome: Path,
               resume_from, dtype: str, checkpointing: bool, rank: int, world: int, feed=None):
    """Train one fresh LoRA on ``base``; returns ``base`` without it, ready for the next job. Rank 0
    sends each step's loss to ``feed`` (``titok.progress``): the driver's progress line."""
    import ray.train

    from titok.runstate import RunDir
    from titok.core.sequences import build_training_batch
    from titok.train import strategy
    from titok.train.batching import epoch_order, worker_micro_batches
    from titok.train.collectives import mean_over_workers
    from titok.train.step import attach_fresh_lora, enable_gradient_checkpointing, training_step, validation_loss

    train, run = job.train, RunDir(job.run_dir)
    seconds = {"setup": -time.perf_counter(), "steps": 0.0, "answers": 0.0, "checkpoints": 0.0}  # where a job's time goes
    plan = _job_plan(job, len(rows), world)
    rows, held_out = _split_validation(job, rows)
    held_out_batches = None  # tokenized once, at the first epoch's end
    ds_config = _job_deepspeed_config(job, plan, dtype == "bfloat16")
    torch.manual_seed(job.seed)  # the same fresh LoRA on every rank, whatever trained before it
    lora = train.lora
    model = attach_fresh_lora(base, lora.rank, lora.alpha, tuple(lora.target_modules), lora.dropout)
    if checkpointing:
        enable_gradient_checkpointing(model)
    warmup = int(train.warmup_ratio * plan.total_steps)
    engine = strategy.build_engine(model, ds_config, train.lr, train.weight_decay,
                                   lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, _linear_warmup_decay(plan.total_steps, warmup)))
    progress["job"] = name
    state = {"step": 0, "losses": [], "val_losses": []}
    if resume_from is not None:
        with resume_from.as_directory() as directory:
            state = {"val_losses": [], **strategy.load_state(engine, directory)}  # older checkpoints lack it
        run.log_event(event="train_resumed", stage="train", rank=rank, step=state["step"])

    every = train.checkpoint_every_steps
    order_epoch, order = -1, None
    seconds["setup"] += time.perf_counter()
    try:
        for step in range(state["step"], plan.total_steps):
            started = time.perf_counter()
            epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_order(plan.rows, job.seed, epoch, plan.global_batch)
            micro_losses = []
            for j, indices in enumerate(worker_micro_batches(order, plan, step_in_epoch, rank)):
                torch.manual_seed(_micro_batch_seed(job.seed, step, plan, rank, j))  # dropout
                picked = [rows[i] for i in indices]
                # a distilling method's rows carry the expert's top-n log-probs on target tokens
                teacher = [r[C.TARGET_TEACHER] for r in picked] if C.TARGET_TEACHER in picked[0] else None
                batch = build_training_batch(tokenizer, [r[C.QUERY] for r in picked], [r[C.RESPONSE] for r in picked],
                                             [r[C.TARGET_WEIGHTS] for r in picked], job.max_length, teacher)
                micro_losses.append(training_step(engine, batch.to(engine.device), train.normalization, job.k,
                                                  train.distill_weight))
            loss = mean_over_workers(float(np.mean(micro_losses)), engine.device)
            state = {**state, "step": step + 1, "losses": state["losses"] + [loss]}
            final = state["step"] == plan.total_steps
            epoch_end = state["step"] % plan.steps_per_epoch == 0
            if held_out and (final or epoch_end):
                held_out_batches = held_out_batches or _validation_batches(engine, tokenizer, held_out, job, plan)
                state["val_losses"] = state["val_losses"] + [validation_loss(engine, held_out_batches)]
            if held_out and final and train.validation_generations:
                answers_started = time.perf_counter()
                state["val_answers"] = _held_out_answers(engine, tokenizer, held_out, job, plan, rank, world)
                seconds["answers"] = time.perf_counter() - answers_started
            if rank == 0 and feed is not None:
                pushed = feed.push.remote((name, state["step"], plan.total_steps, loss))  # not waited for ...
                if final:
                    ray.get(pushed)  # ... but the last: the driver's final drain must see every step
            _inject_fault(job, state["step"], rank, world)
            seconds["steps"] += time.perf_counter() - started - (seconds["answers"] if final else 0.0)
            if final or epoch_end or (every and state["step"] % every == 0):
                started = time.perf_counter()
                _report(engine, model, state, plan, rank, progress, outcome if final else None)
                seconds["checkpoints"] += time.perf_counter() - started
    except FloatingPointError as err:
        # every rank gets here at the same micro-step; a retry would diverge the same way, so this job
        # ends with its reason as its outcome and the group goes on with the next
        _report_failure(f"step {step}: {err}", step, rank, progress, outcome)
    import resource

    run.log_event(event="train_done", stage="train", rank=rank, seconds={k: round(v, 2) for k, v in seconds.items()},
                  peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  lora_dtypes=sorted({str(p.dtype) for n, p in model.named_parameters() if "lora_" in n}))
    return _detach(model, engine, checkpointing)


def _check_kept_rate(base, tokenizer, name: str, job: TrainingJob, rows: list[dict], progress: dict, outcome: Path,
                     dtype: str, rank: int, world: int, feed=None):
    """The held-out answers check alone on a rate kept by a run without it, or before it counted the
    answers' spread (``job.check_adapter``): its LoRA is loaded, not trained, answers the held-out
    queries as after training, and the kept metrics gain its share and spread; the outcome's adapter
    files are the kept ones, byte for byte (so what was evaluated of it stays valid). Returns ``base`` without the LoRA, like ``_train_job``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    import ray

    from titok.runstate import ADAPTER_WEIGHTS, RunDir
    from titok.train import strategy
    from titok.train.step import attach_fresh_lora, validation_loss

    started = time.perf_counter()
    kept = _read_outcome(Path(job.check_adapter), name)
    plan = _job_plan(job, len(rows), world)
    _, held_out = _split_validation(job, rows)
    lora = job.train.lora
    model = attach_fresh_lora(base, lora.rank, lora.alpha, tuple(lora.target_modules), lora.dropout)
    # loaded before the engine is built: under ZeRO-3, building it partitions the LoRA as it holds it then
    set_peft_model_state_dict(model, load_file(Path(job.check_adapter) / ADAPTER_WEIGHTS))
    engine = strategy.build_engine(model, _job_deepspeed_config(job, plan, dtype == "bfloat16"), job.train.lr,
                                   job.train.weight_decay, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    progress["job"] = name
    if rank == 0 and feed is not None:
        feed.push.remote((name, 0, 1, None))  # on the driver's line: which kept rate is answering
    # the loaded LoRA's validation loss again, beside the recorded one: the event shows they agree
    val_loss = validation_loss(engine, _validation_batches(engine, tokenizer, held_out, job, plan)) if held_out else None
    answers = _held_out_answers(engine, tokenizer, held_out, job, plan, rank, world) if held_out else {}
    metrics = {**kept.metrics, **answers}
    _end_job(rank, progress, outcome, {"metrics": metrics, "val_losses": kept.val_losses}, adapter_from=job.check_adapter)
    if rank == 0 and feed is not None:
        ray.get(feed.push.remote((name, 1, 1, None)))
    RunDir(job.run_dir).log_event(event="train_done", stage="train", rank=rank, checked_only=True,
                                  val_loss=val_loss, recorded_val_loss=metrics.get("val_loss"),
                                  seconds={"answers": round(time.perf_counter() - started, 2)})
    return _detach(model, engine, False)


def _held_out_answers(engine, tokenizer, held_out: list[dict], job: TrainingJob, plan, rank: int,
                      world: int) -> dict:
    """The held-out answers check's metrics: of the first ``train.validation_generations`` held-out
    queries, the share the trained LoRA answers to the end (``step.held_out_answers``), and how its
    answers spread against the expert's on the same queries (``validation_split.answers_spread``). Each
    rank answers its share and the counts are summed. Under ZeRO-3 every forward gathers the base
    module by module, so the base is gathered whole once where every rank has room for it
    (``_gathers_base_once``); where one has not (a 70B target), every decode step gathers it, so every
    rank answers all the queries in one batch, in step with the others."""
    from titok.core.validation_split import answer_counts, answers_spread
    from titok.runstate import RunDir
    from titok.train import strategy
    from titok.train.collectives import sum_over_workers
    from titok.train.step import held_out_answers

    answered = held_out[: job.train.validation_generations]
    partitioned = job.group.deepspeed_stage == 3
    gather_once = partitioned and _gathers_base_once(engine, job, world)
    in_step = partitioned and world > 1 and not gather_once
    mine = answered if in_step else answered[rank::world]
    started = time.perf_counter()
    with strategy.gathered_for_generation(engine, gather_once):
        answers = held_out_answers(engine, tokenizer, [r[C.QUERY] for r in mine], [len(r[C.TARGET_WEIGHTS]) for r in mine],
                                   len(mine) if in_step else plan.micro_batch, synced_gpus=in_step)
    RunDir(job.run_dir).log_event(event="held_out_answers", stage="train", rank=rank, queries=len(mine),
                                  base_gathered_once=gather_once, in_step=in_step,
                                  seconds=round(time.perf_counter() - started, 2))
    keys, counts, expert_counts = answer_counts([text for _, text in answers], [r[C.RESPONSE] for r in answered])
    mine_counts = [sum(ended for ended, _ in answers), len(answers), *counts]
    ended, n, *counts = mine_counts if in_step else sum_over_workers(mine_counts, engine.device)
    spread = answers_spread(keys, counts, expert_counts)
    return {"val_answers_end": ended / n, "val_answers_checked": n,
            **{metric: spread[key] for key, metric in _SPREAD_METRICS.items()}}


def _gathers_base_once(engine, job: TrainingJob, world: int) -> bool:
    """``train.gather_base_for_answers``: whether every rank holds the whole base for the held-out
    answers (``validation_split.gathers_base_once`` on its own free memory; ranks on one host share it on
    CPU). All ranks agree (one count on the training device), since the gather is a collective."""
    import ray

    from titok.core.validation_split import gathers_base_once
    from titok.train import strategy
    from titok.train.collectives import sum_over_workers

    if job.train.gather_base_for_answers == "never":
        return False
    sharing = 1 if engine.device.type == "cuda" else ray.train.get_context().get_local_world_size()
    fits = gathers_base_once(strategy.whole_model_bytes(engine.module), strategy.free_memory_bytes(engine.device, sharing))
    return sum_over_workers([int(fits)], engine.device)[0] == world


# an answers_spread as the train metrics name it
_SPREAD_METRICS = {"top": "val_answers_top", "share": "val_answers_top_share", "expert_share": "val_expert_top_share",
                   "collapsed": "val_answers_collapsed"}


def _validation_batches(engine, tokenizer, held_out: list[dict], job: TrainingJob, plan) -> list:
    """The held-out rows in micro-batches on the training device, for ``step.validation_loss``.

    Every rank scores all the held-out rows (a tenth of a few hundred samples, forward only): the
    ranks get the same number, with no collective to agree on it, and under ZeRO-3, whose forward
    gathers parameters collectively, every rank runs the same forwards."""
    from titok.core.sequences import build_training_batch

    return [build_training_batch(tokenizer, [r[C.QUERY] for r in chunk], [r[C.RESPONSE] for r in chunk],
                                    [r[C.TARGET_WEIGHTS] for r in chunk], job.max_length).to(engine.device)
               for chunk in (held_out[i : i + plan.micro_batch] for i in range(0, len(held_out), plan.micro_batch))]


def _detach(model, engine, checkpointing: bool):
    """The base without the job's LoRA, its DeepSpeed engine freed (the next job builds its own)."""
    import gc

    if checkpointing:
        model.base_model.model.gradient_checkpointing_disable()
        model.base_model.model.disable_input_require_grads()
    engine.destroy()
    base = model.unload()  # the original modules back in place of the LoRA layers, weights untouched
    del engine, model
    gc.collect()
    return base


def _finish(progress: dict, failed: bool) -> None:
    """The job in progress moves to the done (or failed) list."""
    progress["failed" if failed else "done"].append(progress["job"])
    progress["job"] = None


def _report(engine, model, state: dict, plan, rank: int, progress: dict, outcome: Path | None) -> None:
    """A checkpoint to resume from: every rank saves its partition, rank 0 adds the progress; Ray Train
    merges the ranks' folders into one. At a job's end (``outcome``) there is nothing to resume, only
    the progress, and rank 0 writes the adapter and metrics where the driver reads them."""
    import ray.train

    from titok.train import strategy

    losses = state["losses"]
    steps_per_epoch = plan.steps_per_epoch
    job = progress["job"]
    metrics = {"step": state["step"], "epoch": (state["step"] - 1) // steps_per_epoch, "final": outcome is not None,
               "loss": float(np.mean(losses[-steps_per_epoch:])), "first_loss": losses[0],
               "optimizer_steps": plan.total_steps, "micro_batch": plan.micro_batch, "accumulation": plan.accumulation,
               "train_rows": plan.rows}
    if state["val_losses"]:
        metrics["val_loss"] = state["val_losses"][-1]
    metrics |= state.get("val_answers", {})  # the held-out answers check, after the last step
    with tempfile.TemporaryDirectory() as tmp:
        if outcome is None:
            strategy.save_state(engine, tmp, state)
        else:
            adapter = strategy.lora_state_dict(model)  # a collective under ZeRO-3: every rank takes part
            _finish(progress, failed=False)
            if rank == 0:
                model.save_pretrained(tmp, state_dict=adapter, safe_serialization=True)
                _write_outcome(outcome, {"metrics": metrics, "losses": losses, "val_losses": state["val_losses"]},
                               adapter_from=tmp)
        if rank == 0:
            Path(tmp, _PROGRESS).write_text(json.dumps(progress))
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 or outcome is None else None
        ray.train.report({**metrics, "job": job}, checkpoint=checkpoint)


def _report_failure(reason: str, step: int, rank: int, progress: dict, outcome: Path) -> None:
    """End a job with ``reason`` as its outcome; the checkpoint records it so a restart skips it."""
    _end_job(rank, progress, outcome, {"failed": reason, "step": step}, failed=True)


def _end_job(rank: int, progress: dict, outcome: Path, result: dict, failed: bool = False,
             adapter_from: str | None = None) -> None:
    """A job that needs no resumable state at its end (a failure, a kept rate's check): it moves to the
    done (or failed) list, rank 0 writes its outcome (``result``, and the adapter files of ``adapter_from``)
    and a checkpoint holding only the progress, so a restarted group skips it."""
    import ray.train

    reported = {**result.get("metrics", result), "job": progress["job"]}
    _finish(progress, failed=failed)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            Path(tmp, _PROGRESS).write_text(json.dumps(progress))
            _write_outcome(outcome, result, adapter_from=adapter_from)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(reported, checkpoint=checkpoint)


def _write_outcome(folder: Path, result: dict, adapter_from: str | None = None) -> None:
    """A job's outcome folder, whole or not at all (built aside, then renamed into place)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in ADAPTER_FILES if adapter_from else ():
        shutil.copy2(Path(adapter_from) / name, tmp / name)
    (tmp / "result.json").write_text(json.dumps(result))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _inject_fault(job: TrainingJob, step: int, rank: int, world: int) -> None:
    """Test hook: the last worker dies once, after optimizer step ``fault_at_step``.

    It dies a few seconds later, as a real crash comes a while after the last checkpoint: Ray Train's
    controller collects reports by polling the workers (every 2 s), and a checkpoint reported an
    instant before its worker dies may never be registered.
    """
    at, marker = job.fault_at_step, job.fault_marker
    if at is None or step != at or rank != world - 1 or Path(marker).exists():
        return
    Path(marker).write_text(f"worker {rank} killed after step {step}")
    time.sleep(5)
    os._exit(1)


def group_jobs(jobs: dict[str, TrainingJob], groups_at_once: int = 1) -> list[list[str]]:
    """Job names in worker groups: jobs with the same ``WorkerGroup`` can share a loaded target, spread
    over ``groups_at_once`` groups (the trainings a cluster runs side by side); a ZeRO-3 job always
    trains alone."""
    by_group: dict[WorkerGroup, list[str]] = {}
    for name, job in jobs.items():
        by_group.setdefault(job.group, []).append(name)
    groups = []
    for group, names in by_group.items():
        if group.deepspeed_stage == 3:
            groups += [[n] for n in names]
        else:
            n_groups = min(groups_at_once, len(names))
            groups += [names[i::n_groups] for i in range(n_groups)]
    return groups


def _read_outcome(folder: Path, name: str) -> TrainOutcome | None:
    path = folder / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if "failed" in result:
        return TrainOutcome(name, error=FloatingPointError(result["failed"]))
    return TrainOutcome(name, adapter_dir=folder, metrics=result["metrics"], val_losses=result.get("val_losses", []))


def run_training(jobs: dict[str, tuple[object, TrainingJob]], storage_path: str, name: str = "train",
                 log_dir: str | None = None) -> dict[str, TrainOutcome]:
    """Train every job on one worker group; ``{job name: TrainOutcome}``, one failure per job.

    ``jobs``: ``{name: (dataset, TrainingJob)}``, the dataset with columns sample_id, query, response,
    target_weights (and target_teacher for a distilling method). Every job must have the same
    ``WorkerGroup``. A job whose adapter is already under the outcomes folder is not trained again;
    the same ``storage_path`` and ``name`` resume an interrupted run from its last checkpoint. Model
    loads are logged in ``log_dir`` (default: the first job's ``run_dir``).

    A job with ``train.lr_search`` trains one LoRA per rate (``<job>@lr<rate>``, on the same rows and
    held-out rows; in one group, or one group each under ZeRO-3); its outcome is the rate with the
    lowest final validation loss among those whose held-out answers end and do not collapse to one answer
    (``titok.core.validation_split.best_lr``), with every rate's curve in ``lr_search``, its share of ending
    answers in ``answers_end`` and their spread in ``answers_spread``. A rate
    already under the job's ``kept_rates_dir`` is taken from there, not trained; if it was kept without
    the held-out answers check or its spread (an older titok, or ``validation_generations`` 0 then), its LoRA only
    answers the held-out queries, in the same worker group as the trainings.
    """
    trials = {_trial(job_name, lr): (ds, job.with_lr(lr))
              for job_name, (ds, job) in jobs.items() for lr in job.train.lr_search or [None]}
    outcomes = {trial: kept for trial, (_, job) in trials.items() if (kept := _kept_rate(job, trial)) is not None}
    runs = {trial: (ds, job) for trial, (ds, job) in trials.items() if trial not in outcomes}
    runs |= {trial + _CHECK_ONLY: (trials[trial][0], trials[trial][1].checking(str(kept.adapter_dir)))
             for trial, kept in outcomes.items() if _unchecked(trials[trial][1], kept)}
    groups = group_jobs({run: job for run, (_, job) in runs.items()})  # ZeRO-3: one rate each
    for i, names in enumerate(groups):
        done = _run_jobs({n: runs[n] for n in names}, storage_path, name if len(groups) == 1 else f"{name}-{i}", log_dir)
        outcomes |= {run.removesuffix(_CHECK_ONLY): _keep_rate(runs[run][1], outcome) for run, outcome in done.items()}
    return {job_name: _chosen(job_name, job, outcomes) for job_name, (_, job) in jobs.items()}


_CHECK_ONLY = ":check"  # a kept rate's answers check runs as <job>@lr<rate>:check, apart from its training's records


def _unchecked(job: TrainingJob, kept: TrainOutcome) -> bool:
    """Whether a kept rate's LoRA lacks the held-out answers check this job asks for (or its answers'
    spread, which the check has counted since)."""
    return (kept.error is None and _answers_spread(kept.metrics) is None and job.train.validation_generations > 0
            and job.train.validation_fraction > 0)


def _kept_rate(job: TrainingJob, trial: str) -> TrainOutcome | None:
    """A rate of an lr_search trained by an earlier run with the same recipe (``TrainingJob.kept_rates_dir``)."""
    return _read_outcome(_rate_folder(job), trial) if job.kept_rates_dir else None


def _keep_rate(job: TrainingJob, outcome: TrainOutcome) -> TrainOutcome:
    """A trained rate of an lr_search, copied under ``kept_rates_dir`` (adapter and curve, or its
    divergence: a rate that diverged with this recipe and seed would diverge again); the copy is the
    outcome from then on. A rate that crashed is not kept: a rerun trains it."""
    if not job.kept_rates_dir or not (outcome.error is None or isinstance(outcome.error, FloatingPointError)):
        return outcome
    result = ({"failed": str(outcome.error)} if outcome.error is not None
              else {"metrics": outcome.metrics, "val_losses": outcome.val_losses})
    _write_outcome(_rate_folder(job), result, adapter_from=outcome.adapter_dir)
    return _read_outcome(_rate_folder(job), outcome.name)


def _rate_folder(job: TrainingJob) -> Path:
    return Path(job.kept_rates_dir) / f"lr{job.train.lr:g}"


def _trial(job_name: str, lr: float | None) -> str:
    return job_name if lr is None else f"{job_name}@lr{lr:g}"


def _chosen(job_name: str, job: TrainingJob, outcomes: dict[str, TrainOutcome]) -> TrainOutcome:
    """A job's outcome; under lr_search, the best rate's adapter and metrics as the job's own."""
    from titok.core.validation_split import best_lr

    if not job.train.lr_search:
        return outcomes[job_name]
    tried = {lr: outcomes[_trial(job_name, lr)] for lr in job.train.lr_search}
    curves = {lr: [] if o.error is not None else o.val_losses for lr, o in tried.items()}
    ends = {lr: o.metrics.get("val_answers_end") for lr, o in tried.items()}  # None: not checked
    spreads = {lr: _answers_spread(o.metrics) for lr, o in tried.items()}
    checks = {"lr_search": curves, "answers_end": ends, "answers_spread": spreads}
    crashed = [o.error for o in tried.values() if o.error is not None and not isinstance(o.error, FloatingPointError)]
    if crashed:  # a rate that never finished is no evidence against it: the job fails, and a rerun goes on
        return TrainOutcome(job_name, error=crashed[0], **checks)
    try:
        lr = best_lr(curves, ends, spreads)
    except ValueError as err:
        errors = "; ".join(f"lr {rate:g}: {o.error}" for rate, o in tried.items() if o.error is not None)
        return TrainOutcome(job_name, error=RuntimeError(f"{err}{' (' + errors + ')' if errors else ''}"), **checks)
    won = tried[lr]
    return TrainOutcome(job_name, adapter_dir=won.adapter_dir, metrics={**won.metrics, "lr": lr},
                        val_losses=won.val_losses, **checks)


def _answers_spread(metrics: dict) -> dict | None:
    """A rate's held-out answers spread (``validation_split.answers_spread``) from its metrics; None where not counted."""
    if any(metric not in metrics for metric in _SPREAD_METRICS.values()):
        return None
    return {key: metrics[metric] for key, metric in _SPREAD_METRICS.items()}


def _run_jobs(jobs: dict[str, tuple[object, TrainingJob]], storage_path: str, name: str,
              log_dir: str | None) -> dict[str, TrainOutcome]:
    """``run_training`` for jobs of one learning rate each."""
    if len({job.group for _, job in jobs.values()}) > 1:
        raise ValueError(f"jobs {list(jobs)} differ in target or worker settings (WorkerGroup): "
                         "they cannot share one worker group (group_jobs splits them)")
    outcomes_dir = Path(storage_path) / f"{name}-outcomes"
    outcomes = {n: _read_outcome(outcomes_dir / n, n) for n in jobs}
    todo, materialized = {}, {}
    for job_name, (ds, job) in jobs.items():
        if outcomes[job_name] is not None and outcomes[job_name].error is None:
            continue  # trained before this call (a resubmitted job)
        shutil.rmtree(outcomes_dir / job_name, ignore_errors=True)  # an earlier divergence: retried
        outcomes[job_name] = None
        # Materialized first: the workers hold the CPUs, and a lazy read would wait for one forever.
        if id(ds) not in materialized:  # once for all the rates of an lr_search
            materialized[id(ds)] = ds.materialize()
        ds = materialized[id(ds)]
        try:
            _job_plan(job, ds.count(), job.group.workers)  # a recipe that cannot run fails here, alone
        except ValueError as err:
            outcomes[job_name] = TrainOutcome(job_name, error=err)
            continue
        todo[job_name] = (ds, job)
    if todo:
        error = _fit(todo, storage_path, name, outcomes_dir, log_dir)
        for job_name in todo:
            outcomes[job_name] = _read_outcome(outcomes_dir / job_name, job_name) or TrainOutcome(
                job_name, error=error or RuntimeError(f"training of {job_name!r} ended without an adapter"))
    return outcomes


def _fit(jobs: dict, storage_path: str, name: str, outcomes_dir: Path, log_dir: str | None) -> BaseException | None:
    """One Ray Train run over ``jobs``; the error that ended it, if one did."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from titok.train import device_rules

    trainer_class = _trainer_class()
    typed = {job_name: job for job_name, (_, job) in jobs.items()}
    first = next(iter(typed.values()))
    group = first.group
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if group.use_gpu else "cpu")
    with contextlib.ExitStack() as stack:  # the workers' steps on this driver's progress line
        bar = progress.current() or stack.enter_context(progress.stage(name))
        feed = stack.enter_context(progress.watch_feed(functools.partial(_show_step, bar)))
        trainer = trainer_class(
            train_loop_per_worker,
            train_loop_config={"group": group, "jobs": typed, "outcomes": str(outcomes_dir),
                               "log_dir": log_dir or first.run_dir, "attempt": uuid.uuid4().hex,
                               "progress_feed": feed},
            scaling_config=ScalingConfig(num_workers=group.workers, use_gpu=group.use_gpu,
                                         resources_per_worker={"CPU": group.cpus_per_worker,
                                                               **({"GPU": 1} if group.use_gpu else {})}),
            run_config=RunConfig(
                storage_path=storage_path, name=name, checkpoint_config=CheckpointConfig(num_to_keep=1),
                failure_config=FailureConfig(max_failures=group.max_failures),
                worker_runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"],
                                                 **({device_rules.ENV: "1"} if device_rules.enabled() else {})}},
            ),
            datasets={job_name: ds for job_name, (ds, _) in jobs.items()},
            dataset_config=DataConfig(datasets_to_split=[]),  # every worker reads all rows and picks its own
        )
        try:
            fit = trainer.fit()
        except Exception as err:  # noqa: BLE001 - the group's failure is each unfinished job's outcome
            return err
    return fit.error


def _trainer_class():
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        """Ray Train's TorchTrainer without its SIGINT handler, which aborts the training and lets the
        driver carry on to the next stage: Ctrl-C stops the whole titok command (``titok.signals``)."""

        def _register_sigint_handler(self, controller) -> None:
            pass

    return Trainer


def _show_step(bar, item: tuple) -> None:
    """A worker's ``(job, step, total, loss)`` on the driver's progress line; loss None: a kept rate's
    held-out answers check (``<job>@lr<rate>:check``), one unit of work."""
    job, step, total, loss = item
    check = job.endswith(_CHECK_ONLY)
    if bar.bar.total != total or bar.job != job:
        bar.start(total, "checks" if check else "steps")
        bar.job = job
    adapter, _, lr = job.removesuffix(_CHECK_ONLY).partition("@lr")  # an lr_search's rate trains as <job>@lr<rate>
    shown = {"adapter": adapter} if adapter != "default" else {}
    what = {"checking": "held-out answers of a kept rate"} if check else {"loss": f"{loss:.4f}"}
    bar.set(step, **what, **shown, **({"lr": lr} if lr else {}))


def train_adapter(ds, job: TrainingJob, storage_path: str, name: str = "train") -> TrainOutcome:
    """One job (a transplant's target LoRA, ``titok sft``'s source LoRA) on its own worker group."""
    return run_training({"default": (ds, job)}, storage_path, name)["default"]


def copy_adapter(outcome: TrainOutcome, out_dir: str | Path) -> Path:
    """A finished job's adapter files (not its optimizer state) into ``out_dir``; raises its error."""
    if outcome.error is not None:
        raise outcome.error
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in ADAPTER_FILES:
        shutil.copy2(outcome.adapter_dir / file, out_dir / file)
    return out_dir
