"""DeepSpeed for target-LoRA training: the only module that imports DeepSpeed.

- The config is one of the JSON files shipped in ``titok/train/deepspeed/`` (or the user's
  ``train.deepspeed_config``) with its ``"auto"`` fields filled from the batch plan and train config.
- Under ZeRO-3 the target is built partitioned: ``HfDeepSpeedConfig`` is alive while
  ``from_pretrained`` runs, so transformers builds the model inside ``deepspeed.zero.Init`` and each
  rank only ever holds its shard (a 70B model never exists whole in one process). Without it
  DeepSpeed would move a whole model onto each rank's device.
- Checkpoints are DeepSpeed's own (``save_checkpoint`` without the frozen base weights): each rank
  writes its optimizer/parameter partition, with our trainer state as DeepSpeed's client state, so a
  restarted worker group continues where the last checkpoint was taken. DeepSpeed drops a frozen
  tensor under one of its names only, so a tied one (the LM head that is the embedding: Gemma,
  small Llamas and Qwens) stayed in every checkpoint (672 MB for Gemma-3-270M); ``build_engine``
  makes the engine drop every name of it.
"""

from __future__ import annotations

import copy
import functools
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

__all__ = [
    "DEEPSPEED_CONFIG_DIR",
    "build_engine",
    "deepspeed_config",
    "free_memory_bytes",
    "gathered_for_generation",
    "is_partitioned",
    "load_state",
    "load_target",
    "lora_state_dict",
    "save_state",
    "whole_model_bytes",
    "whole_numel",
]

DEEPSPEED_CONFIG_DIR = Path(__file__).resolve().parent / "deepspeed"
_STATE_TAG = "state"


def deepspeed_config(stage: int, micro_batch: int, accumulation: int, max_grad_norm: float, bf16: bool,
                     offload_optimizer: bool = False, offload_params: bool = False, path: str | None = None) -> dict:
    """A DeepSpeed config: the shipped JSON for ``stage`` (or ``path``), ``"auto"`` fields filled in."""
    config = json.loads(Path(path or DEEPSPEED_CONFIG_DIR / f"zero{stage}.json").read_text())
    config.pop("_comment", None)
    config.pop("train_batch_size", None)  # DeepSpeed derives it: micro x accumulation x world size
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = stage
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = accumulation
    config["gradient_clipping"] = max_grad_norm
    config["bf16"] = {"enabled": bf16}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return config


def load_target(spec: str, dtype: torch.dtype, ds_config: dict, trust_remote_code: bool = False):
    """``(model, keep_alive)``: the target base, partitioned as it loads under ZeRO-3.

    Keep ``keep_alive`` referenced while the model trains: transformers and PEFT ask it whether
    ZeRO-3 is on (it is held through a weak reference).
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from titok.models import resolve_model_path

    keep_alive = HfDeepSpeedConfig(copy.deepcopy(ds_config)) if ds_config["zero_optimization"]["stage"] == 3 else None
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(spec), dtype=dtype, trust_remote_code=trust_remote_code)
    return model, keep_alive


def is_partitioned(param: torch.nn.Parameter) -> bool:
    """True for a ZeRO-3 parameter that this rank holds only as a shard (full tensor never local)."""
    return hasattr(param, "ds_id") and param.numel() == 0


def build_engine(model, ds_config: dict, lr: float, weight_decay: float, scheduler_fn):
    """A DeepSpeed engine over the trainable (LoRA) parameters.

    With optimizer offload the optimizer is DeepSpeed's (its CPU Adam); otherwise torch's AdamW.
    ``scheduler_fn(optimizer)`` builds the LR schedule, which DeepSpeed steps at each optimizer step.
    """
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    if "offload_optimizer" in ds_config.get("zero_optimization", {}):
        ds_config = {**ds_config, "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay}}}
        optimizer = None
    else:
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=optimizer,
                                           lr_scheduler=scheduler_fn, config=ds_config, dist_init_required=False)
    engine.module_state_dict = functools.partial(_module_state_dict, engine)  # what save_checkpoint writes
    return engine


def _module_state_dict(engine, exclude_frozen_parameters: bool = False, **kwargs) -> dict:
    """DeepSpeed's ``module_state_dict``, but without a frozen tensor under any of its names (DeepSpeed
    looks names up in ``named_parameters()``, which lists a tied tensor once)."""
    state = type(engine).module_state_dict(engine, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
    if exclude_frozen_parameters:
        for name, param in engine.module.named_parameters(remove_duplicate=False):
            if not param.requires_grad:
                state.pop(name, None)
    return state


def whole_numel(param: torch.nn.Parameter) -> int:
    """Elements of ``param`` whole, partitioned (ZeRO-3: this rank holds a shard) or not."""
    return getattr(param, "ds_numel", param.numel())


def whole_model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter of ``model`` whole, partitioned or not."""
    return sum(whole_numel(p) * p.element_size() for p in model.parameters())


def free_memory_bytes(device: torch.device, sharing: int = 1) -> int:
    """Memory a rank may still take on ``device``: the GPU's free memory with what torch's caching
    allocator holds unused, or on CPU the host's available memory split over the ``sharing`` ranks on
    this host."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    import psutil

    return psutil.virtual_memory().available // max(1, sharing)


@contextmanager
def gathered_for_generation(engine, gather: bool):
    """Under ZeRO-3 with ``gather``: the whole base gathered on this rank (a collective: every rank
    enters with the same ``gather``) and DeepSpeed's per-module gather hooks off until the block ends,
    so generation runs as on one device, with no collective per decode step. DeepSpeed's own
    ``unwrap_model_for_generation``; without ``gather`` nothing changes."""
    if not gather:
        yield
        return
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with unwrap_model_for_generation(engine):
        yield


def lora_state_dict(model) -> dict:
    """LoRA weights as full CPU tensors on every rank (ZeRO-3 holds only partitions until gathered)."""
    import deepspeed
    from peft import get_peft_model_state_dict

    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    partitioned = any(hasattr(p, "ds_id") for p in lora_params)
    gathered = deepspeed.zero.GatheredParameters(lora_params, modifier_rank=None) if partitioned else nullcontext()
    with gathered:
        return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def save_state(engine, directory: str | Path, trainer_state: dict) -> None:
    """This rank's share of a resumable checkpoint (LoRA, optimizer, scheduler, trainer state)."""
    engine.save_checkpoint(str(Path(directory) / "deepspeed"), tag=_STATE_TAG, client_state={"titok": trainer_state},
                           exclude_frozen_parameters=True)


def load_state(engine, directory: str | Path) -> dict:
    """Restore what ``save_state`` wrote (every rank reads its own partition); returns the trainer state."""
    path, client = engine.load_checkpoint(str(Path(directory) / "deepspeed"), tag=_STATE_TAG, load_module_strict=False)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed state under {directory}")
    return client["titok"]
