"""One optimizer step of selective LoRA training, free of Ray and DeepSpeed so it is testable alone."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from titok.loss import Normalization, TrainingBatch, selective_cross_entropy

__all__ = ["attach_fresh_lora", "selective_loss", "training_step"]


def attach_fresh_lora(
    model: PreTrainedModel,
    rank: int = 8,
    alpha: int = 8,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    dropout: float = 0.05,
) -> PeftModel:
    """A new, zero-initialized LoRA (the release's shape by default: r=8, alpha=8, q/v, dropout 0.05)."""
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
        bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def selective_loss(
    model: torch.nn.Module, batch: TrainingBatch, normalization: Normalization = "selected_mean", k: float | None = None
) -> torch.Tensor:
    """Selective CE; logits only from the first position that predicts a response token."""
    keep_from = batch.logits_start()
    logits = model(**batch.model_inputs(), logits_to_keep=batch.input_ids.shape[1] - keep_from).logits
    return selective_cross_entropy(logits, batch.input_ids[:, keep_from:], batch.token_weights[:, keep_from:],
                                   batch.response_mask[:, keep_from:], normalization, k)


def training_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TrainingBatch,
    normalization: Normalization = "selected_mean",
    k: float | None = None,
    max_grad_norm: float | None = 0.3,
) -> float:
    """Forward, backward, clip, step. Raises on a non-finite loss instead of training on it."""
    model.train()
    loss = selective_loss(model, batch, normalization, k)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    return loss.item()
