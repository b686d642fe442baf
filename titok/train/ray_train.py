"""Target-LoRA training on Ray Train: the worker function and the trainer around it.

Each worker builds the target (partitioned as it loads under ZeRO-3, see ``strategy``), attaches a
fresh LoRA, and runs ``step.training_step`` on its micro-batches of each global batch
(``batching``). Every worker reads all the (few hundred) selected samples from its dataset shard
and picks its rows itself, so the rows of step s never depend on how many workers run it.

Checkpoints (every ``train.checkpoint_every_steps`` optimizer steps and at the end of each epoch)
carry the LoRA, optimizer and scheduler partitions plus the step, so after a worker dies Ray Train
restarts the group (``FailureConfig``) and ``get_checkpoint()`` resumes it mid-epoch at the exact
rows. Dropout is seeded per micro-batch, so a resumed run equals an uninterrupted one. A
non-finite loss is not retried (it would recur): all ranks stop at the same micro-step and the
driver raises it. The final
checkpoint also holds the adapter as a PEFT folder (``adapter_config.json`` +
``adapter_model.safetensors``) at its root.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from titok import columns as C

__all__ = ["ADAPTER_FILES", "GRADIENT_CHECKPOINTING_MIN_PARAMS", "copy_adapter", "run_training", "train_loop_per_worker"]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# gradient_checkpointing "auto": on from this target size (activations dominate memory beyond it)
GRADIENT_CHECKPOINTING_MIN_PARAMS = 1_000_000_000


def _linear_warmup_decay(total_steps: int, warmup: int):
    return lambda step: min((step + 1) / max(warmup, 1), max(0.0, (total_steps - step) / max(total_steps - warmup, 1)))


def _micro_batch_seed(seed: int, global_step: int, plan, rank: int, j: int) -> int:
    """Same micro-batch -> same seed, whichever worker runs it (1 worker x 2 == 2 workers x 1)."""
    micro_per_step = plan.global_batch // plan.micro_batch
    return seed * 1_000_003 + global_step * micro_per_step + rank * plan.accumulation + j


def _all_ranks_finite(ok: bool) -> bool:
    """True only if every rank's loss is finite (one scalar all-reduce per micro-step)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([1.0 if ok else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _mean_over_workers(value: float) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's ``train_func``: runs on every worker."""
    import ray.train

    from titok.hardware import resolve_dtype
    from titok.sequences import build_training_batch
    from titok.models import load_tokenizer
    from titok.runstate import RunDir
    from titok.train import strategy
    from titok.train.batching import epoch_order, plan_batches, worker_micro_batches
    from titok.train.step import attach_fresh_lora, enable_gradient_checkpointing, training_step

    train = config["train"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    rows = sorted(ray.train.get_dataset_shard("train").iter_rows(), key=lambda r: r[C.SAMPLE_ID])
    plan = plan_batches(len(rows), train["global_batch_size"], world, train["micro_batch_size"], train["epochs"],
                        train["max_steps"])

    dtype, dtype_reason = resolve_dtype(train["dtype"], train["use_gpu"], training=True)
    ds_config = strategy.deepspeed_config(train["deepspeed_stage"], plan.micro_batch, plan.accumulation,
                                          train["max_grad_norm"], dtype == "bfloat16", train["offload_optimizer"],
                                          train["offload_params"], train["deepspeed_config"])
    run = RunDir(config["run_dir"])
    tokenizer = load_tokenizer(config["target_base"], config["trust_remote_code"])
    model, _zero3 = strategy.load_target(config["target_base"], getattr(torch, dtype), ds_config, config["trust_remote_code"])
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    checkpointing = train["gradient_checkpointing"]
    if checkpointing == "auto":
        checkpointing = n_params >= GRADIENT_CHECKPOINTING_MIN_PARAMS
    run.log_event(event="model_load", stage="train", rank=rank, node_id=ray.get_runtime_context().get_node_id(),
                  dtype=[dtype, dtype_reason], zero_stage=train["deepspeed_stage"],
                  partitioned=all(strategy.is_partitioned(p) for p in model.parameters()),
                  local_numel=sum(p.numel() for p in model.parameters()), params=n_params,
                  gradient_checkpointing=checkpointing, micro_batch=plan.micro_batch, accumulation=plan.accumulation)

    torch.manual_seed(config["seed"])  # the same fresh LoRA on every rank
    lora = train["lora"]
    model = attach_fresh_lora(model, lora["rank"], lora["alpha"], tuple(lora["target_modules"]), lora["dropout"])
    if checkpointing:
        enable_gradient_checkpointing(model)
    warmup = int(train["warmup_ratio"] * plan.total_steps)
    engine = strategy.build_engine(model, ds_config, train["lr"], train["weight_decay"],
                                   lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, _linear_warmup_decay(plan.total_steps, warmup)))

    state = {"step": 0, "losses": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            failed = Path(directory, "failed.json")
            if failed.is_file():  # a resubmitted run that diverged: it has no state to resume, so start over
                run.log_event(event="train_restarted", stage="train", rank=rank, after=json.loads(failed.read_text()))
            else:
                state = strategy.load_state(engine, directory)
                run.log_event(event="train_resumed", stage="train", rank=rank, step=state["step"])

    every = train["checkpoint_every_steps"]
    order_epoch, order = -1, None
    for step in range(state["step"], plan.total_steps):
        epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_order(plan.rows, config["seed"], epoch, plan.global_batch)
        micro_losses = []
        for j, indices in enumerate(worker_micro_batches(order, plan, step_in_epoch, rank)):
            torch.manual_seed(_micro_batch_seed(config["seed"], step, plan, rank, j))  # dropout
            picked = [rows[i] for i in indices]
            batch = build_training_batch(tokenizer, [r[C.QUERY] for r in picked], [r[C.RESPONSE] for r in picked],
                                         [r[C.TARGET_WEIGHTS] for r in picked], config["max_length"])
            try:
                micro_losses.append(training_step(engine, batch.to(engine.device), train["normalization"], config["k"],
                                                  all_finite=_all_ranks_finite))
            except FloatingPointError as err:
                # every rank gets here at the same micro-step; a retry would diverge the same way, so the
                # run ends (no exception: Ray Train would restart the group) and the driver raises it
                _report_failure(f"step {step}: {err}", step, rank)
                return
        state = {"step": step + 1, "losses": state["losses"] + [_mean_over_workers(float(np.mean(micro_losses)))]}
        if rank == 0 and (state["step"] % max(1, plan.total_steps // 10) == 0 or state["step"] == plan.total_steps):
            print(f"  train step {state['step']}/{plan.total_steps}  loss {state['losses'][-1]:.4f}", flush=True)
        _inject_fault(config, state["step"], rank, world)
        final = state["step"] == plan.total_steps
        if final or state["step"] % plan.steps_per_epoch == 0 or (every and state["step"] % every == 0):
            _report(engine, model, state, plan, rank, final)
    import resource

    run.log_event(event="train_done", stage="train", rank=rank,
                  peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


def _report(engine, model, state: dict, plan, rank: int, final: bool) -> None:
    """Every rank saves its partition; rank 0 adds the adapter and the metrics. Ray Train merges the
    ranks' folders into one checkpoint."""
    import ray.train

    from titok.train import strategy

    adapter = strategy.lora_state_dict(model)  # a collective under ZeRO-3: every rank takes part
    losses = state["losses"]
    steps_per_epoch = plan.steps_per_epoch
    metrics = {"step": state["step"], "epoch": (state["step"] - 1) // steps_per_epoch, "final": final,
               "loss": float(np.mean(losses[-steps_per_epoch:])), "first_loss": losses[0],
               "optimizer_steps": plan.total_steps, "micro_batch": plan.micro_batch, "accumulation": plan.accumulation}
    with tempfile.TemporaryDirectory() as tmp:
        strategy.save_state(engine, tmp, state)
        if rank == 0:
            model.save_pretrained(tmp, state_dict=adapter, safe_serialization=True)
            Path(tmp, "losses.json").write_text(json.dumps(losses))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _report_failure(reason: str, step: int, rank: int) -> None:
    """End the run with ``reason`` as its result (Ray Train keeps a checkpoint's metrics as the result's)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            Path(tmp, "failed.json").write_text(json.dumps({"reason": reason, "step": step}))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"failed": reason, "step": step}, checkpoint=checkpoint)


def _inject_fault(config: dict, step: int, rank: int, world: int) -> None:
    """Test hook: the last worker dies once, after optimizer step ``fault_at_step``.

    It dies a few seconds later, as a real crash comes a while after the last checkpoint: Ray Train's
    controller collects reports by polling the workers (every 2 s), and a checkpoint reported an
    instant before its worker dies may never be registered.
    """
    import time

    at, marker = config.get("fault_at_step"), config.get("fault_marker")
    if at is None or step != at or rank != world - 1 or Path(marker).exists():
        return
    Path(marker).write_text(f"worker {rank} killed after step {step}")
    time.sleep(5)
    os._exit(1)


def run_training(ds, config: dict, storage_path: str, name: str = "train"):
    """Fit on ``ds`` (columns: sample_id, query, response, target_weights); returns the Ray Train Result.

    ``config``: ``train`` (TrainConfig as a dict), ``target_base``, ``seed``, ``run_dir``,
    ``max_length``, ``k``, ``trust_remote_code``; tests may add ``fault_at_step`` + ``fault_marker``.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from titok.train.batching import plan_batches

    train = config["train"]
    # Materialized first: the workers hold the CPUs, and a lazy read would wait for one forever.
    ds = ds.materialize()
    plan_batches(ds.count(), train["global_batch_size"], train["workers"], train["micro_batch_size"], train["epochs"],
                 train["max_steps"])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if train["use_gpu"] else "cpu")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=train["workers"], use_gpu=train["use_gpu"],
                                     resources_per_worker={"CPU": train["cpus_per_worker"],
                                                           **({"GPU": 1} if train["use_gpu"] else {})}),
        run_config=RunConfig(
            storage_path=storage_path, name=name, checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=train["max_failures"]),
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"]}},
        ),
        datasets={"train": ds},
        dataset_config=DataConfig(datasets_to_split=[]),  # every worker reads all rows and picks its own
    )
    return trainer.fit()


def copy_adapter(fit, out_dir: str | Path) -> Path:
    """The trained adapter's files from a finished fit's final checkpoint (not its optimizer state)."""
    import shutil

    if fit.error:
        raise fit.error
    if (fit.metrics or {}).get("failed"):
        raise FloatingPointError(fit.metrics["failed"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with fit.checkpoint.as_directory() as directory:
        for name in ADAPTER_FILES:
            shutil.copy2(Path(directory) / name, out_dir / name)
    return out_dir
