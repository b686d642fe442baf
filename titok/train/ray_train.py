"""Target-LoRA training on Ray Train with DeepSpeed ZeRO: the only module that imports DeepSpeed.

Each worker loads the target base, attaches a fresh LoRA, wraps it in a DeepSpeed engine built from
``cluster/deepspeed/zero{2,3}.json`` (the "auto" fields filled from the train config), and reads its
shard of the selected samples with ``ray.train.get_dataset_shard``. The loss is the selective
cross-entropy over aligned token weights. Rank 0 saves the adapter (gathered from ZeRO-3 partitions)
and reports it as the Ray Train checkpoint.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
import os
import tempfile
from pathlib import Path

import torch

from titok import columns as C

__all__ = ["DEEPSPEED_CONFIG_DIR", "deepspeed_config", "run_training"]

DEEPSPEED_CONFIG_DIR = Path(__file__).resolve().parents[2] / "cluster" / "deepspeed"


def deepspeed_config(stage: int, micro_batch: int, max_grad_norm: float, bf16: bool) -> dict:
    """The stage's JSON from ``cluster/deepspeed/`` with its ``"auto"`` fields filled in."""
    path = DEEPSPEED_CONFIG_DIR / f"zero{stage}.json"
    config = json.loads(path.read_text())
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = 1
    config["gradient_clipping"] = max_grad_norm
    config["bf16"] = {"enabled": bf16}
    config.pop("train_batch_size", None)
    return config


def _lora_state_dict(model, zero_stage: int) -> dict:
    """LoRA weights as full tensors on every rank (ZeRO-3 keeps only partitions until gathered)."""
    import deepspeed
    from peft import get_peft_model_state_dict

    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    gathered = deepspeed.zero.GatheredParameters(lora_params, modifier_rank=None) if zero_stage == 3 else nullcontext()
    with gathered:
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's ``train_func``: runs on every worker."""
    import deepspeed
    import ray.train

    from titok.loss import build_training_batch
    from titok.models import load_model, load_tokenizer
    from titok.runstate import RunDir
    from titok.train.step import attach_fresh_lora, selective_loss

    train = config["train"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(config["seed"])
    RunDir(config["run_dir"]).log_event(event="model_load", stage="train", rank=rank,
                                        node_id=ray.get_runtime_context().get_node_id())
    tokenizer = load_tokenizer(config["target_base"], config["trust_remote_code"])
    model = load_model(config["target_base"], getattr(torch, train["dtype"]), config["trust_remote_code"])
    lora = train["lora"]
    model = attach_fresh_lora(model, lora["rank"], lora["alpha"], tuple(lora["target_modules"]), lora["dropout"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train["lr"], weight_decay=train["weight_decay"])
    steps_per_epoch = max(1, math.ceil(config["rows_per_worker"] / train["batch_size"]))
    total_steps = steps_per_epoch * train["epochs"]
    warmup = int(train["warmup_ratio"] * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / max(warmup, 1), max(0.0, (total_steps - step) / max(total_steps - warmup, 1)))
    )
    ds_config = deepspeed_config(train["deepspeed_stage"], train["batch_size"], train["max_grad_norm"], train["dtype"] == "bfloat16")
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    shard = ray.train.get_dataset_shard("train")
    step, losses = 0, []
    for epoch in range(train["epochs"]):
        for batch in shard.iter_batches(batch_size=train["batch_size"], batch_format="numpy"):
            tb = build_training_batch(tokenizer, list(batch[C.QUERY]), list(batch[C.RESPONSE]),
                                      list(batch[C.TARGET_WEIGHTS]), config["max_length"])
            tb = tb.to(engine.device)
            loss = selective_loss(engine, tb, train["normalization"], config["k"])
            if not torch.isfinite(loss):  # DeepSpeed on CPU/gloo has known bugs: never train on garbage
                raise FloatingPointError(f"rank {rank}: non-finite loss {loss.item()} at step {step}")
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            step += 1
            if rank == 0 and (step % max(1, total_steps // 10) == 0 or step == total_steps):
                print(f"  train step {step}/{total_steps}  loss {losses[-1]:.4f}", flush=True)
        metrics = {"epoch": epoch, "step": step, "loss": float(sum(losses[-steps_per_epoch:]) / max(len(losses[-steps_per_epoch:]), 1))}
        state = _lora_state_dict(model, train["deepspeed_stage"])
        is_last = epoch == train["epochs"] - 1
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                Path(tmp, "losses.json").write_text(json.dumps(losses))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "final": is_last, "first_loss": losses[0] if losses else None}, checkpoint=checkpoint)


def run_training(ds, config: dict, storage_path: str, name: str = "train"):
    """Fit on ``ds`` (columns: query, response, target_weights) and return the Ray Train Result."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = config["train"]
    # Materialized first: the workers hold the CPUs, and a lazy read would wait for one forever.
    ds = ds.materialize()
    rows = ds.count()
    if rows < train["workers"]:
        raise ValueError(f"{rows} training samples cannot feed {train['workers']} workers; lower train.workers")
    config = {**config, "rows_per_worker": rows // train["workers"]}
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if train["use_gpu"] else "cpu")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=train["workers"], use_gpu=train["use_gpu"]),
        run_config=RunConfig(
            storage_path=storage_path, name=name, checkpoint_config=CheckpointConfig(num_to_keep=1),
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"]}},
        ),
        datasets={"train": ds},
    )
    return trainer.fit()
