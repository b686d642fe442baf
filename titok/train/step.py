"""One micro-step of selective LoRA training, the same code under DeepSpeed (Ray Train workers) and
plain torch (tests, the excess demo).

``training_step`` drives anything with DeepSpeed's training interface: ``engine(**inputs)``,
``engine.train()``, ``engine.backward(loss)``, ``engine.step()``. DeepSpeed's engine has it; for a
plain model and optimizer ``TorchEngine`` provides it, with the same gradient-accumulation and
clipping semantics (``step()`` updates the weights only at the end of each accumulation window).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from titok.core.distill import uld_distance
from titok.core.excess import lm_head_only_at
from titok.core.loss import Normalization, normalize, selected_cross_entropy, selective_cross_entropy
from titok.core.sequences import TrainingBatch
from titok.train.collectives import all_ranks_finite

__all__ = ["TorchEngine", "attach_fresh_lora", "enable_gradient_checkpointing", "held_out_answers", "selective_loss",
           "training_step", "validation_loss"]


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


def enable_gradient_checkpointing(model: PeftModel) -> None:
    """Recompute each layer in the backward pass instead of keeping its activations.

    Non-reentrant (works with frozen inputs and keeps the RNG state, so dropout is the same in the
    recompute); the embedding outputs require grad so the LoRA layers behind a frozen embedding still
    get gradients; no KV cache in training.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False


def selective_loss(
    model: torch.nn.Module, batch: TrainingBatch, normalization: Normalization = "selected_mean", k: float | None = None,
    distill_weight: float = 0.0,
) -> torch.Tensor:
    """Selective CE; the LM head runs only where a prediction has weight (``lm_head_only_at``): with
    a 262k vocabulary (Gemma) the head costs more than the body per position, forward and backward.
    With ``distill_weight`` and a batch that carries teacher distributions, plus that weight times the
    mean ULD distance over the trained positions that have one (``titok.core.distill``)."""
    keep_from = batch.logits_start()
    # kept position j predicts input token keep_from + j + 1
    predicts_response = batch.response_mask[:, keep_from + 1 :]
    weights = batch.token_weights[:, keep_from + 1 :] * predicts_response
    selected = weights > 0
    # the hook goes on the model itself: a training engine (DeepSpeed's, TorchEngine) wraps it as
    # ``.module``, and DeepSpeed before 0.18 passes no model method through
    with lm_head_only_at(getattr(model, "module", model), selected) as head:
        logits = model(**batch.model_inputs(), logits_to_keep=batch.logits_to_keep()).logits
    if not head["gathered"]:
        loss = selective_cross_entropy(logits, batch.input_ids[:, keep_from:], batch.token_weights[:, keep_from:],
                                       batch.response_mask[:, keep_from:], normalization, k)
        student = logits[:, :-1][selected.to(logits.device)]
    else:
        targets = batch.input_ids[:, keep_from + 1 :][selected]
        total = selected_cross_entropy(logits[0], targets.to(logits.device), weights[selected].to(logits.device))
        loss = normalize(total, weights, predicts_response, normalization, k)
        student = logits[0]
    if distill_weight and batch.teacher_top is not None:
        teacher = batch.teacher_top[:, keep_from + 1 :][selected].to(logits.device)
        paired = ~teacher[:, 0].isnan()
        if paired.any():
            loss = loss + distill_weight * uld_distance(student[paired], teacher[paired]).mean()
    return loss


def training_step(engine, batch: TrainingBatch, normalization: Normalization = "selected_mean",
                  k: float | None = None, distill_weight: float = 0.0) -> float:
    """Train mode, forward, backward, step. Raises on a non-finite loss instead of training on it,
    on every data-parallel rank at once (``all_ranks_finite``: this rank's alone when not distributed),
    so that no rank waits in a collective for another.
    """
    engine.train()
    loss = selective_loss(engine, batch, normalization, k, distill_weight)
    if not all_ranks_finite(loss):
        raise FloatingPointError(f"non-finite training loss ({loss.item()} on this rank)")
    engine.backward(loss)
    engine.step()
    return loss.item()


def validation_loss(engine, batches: list[TrainingBatch]) -> float:
    """Mean cross-entropy over the kept tokens of ``batches`` (weighted as in training, no distillation
    term), in eval mode (no dropout) and without gradients; the engine is left in eval mode (every
    ``training_step`` sets train mode again)."""
    engine.eval()
    total, weight = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            kept = float((batch.token_weights * batch.response_mask)[:, 1:].sum())
            if kept > 0:
                total += selective_loss(engine, batch, "selected_mean").item() * kept
                weight += kept
    return total / weight if weight else float("nan")


def held_out_answers(engine, tokenizer, queries: list[str], response_tokens: list[int], batch_size: int,
                     synced_gpus: bool = False) -> list[tuple[bool, str]]:
    """The trained LoRA's greedy answer to each held-out query: whether it ends
    (``validation_split.answer_ends``: a stop token within ``answer_budget`` of that sample's expert
    response, ``response_tokens`` long on this tokenizer), and its text up to the stop token. Left-padded
    batches of ``batch_size``; the engine is left in eval mode. ``synced_gpus``: under ZeRO-3 with
    several ranks every forward gathers parameters collectively, so every rank must keep stepping until
    all are done (transformers' ``synced_gpus``)."""
    from titok.core.sequences import EncodedPair, collate, encode_prompt
    from titok.core.validation_split import answer_budget, answer_ends
    from titok.models import stop_token_ids

    model = engine.module
    stop = stop_token_ids(model, tokenizer)  # what the engines stop on, so an answer that ends here ends there
    engine.eval()
    device = getattr(engine, "device", None) or next(model.parameters()).device  # ZeRO-3 may offload the weights
    answers = []
    with torch.no_grad():
        for start in range(0, len(queries), batch_size):
            chunk = slice(start, start + batch_size)
            prompts = [EncodedPair(encode_prompt(tokenizer, q), [], []) for q in queries[chunk]]
            batch = collate(prompts, tokenizer.pad_token_id, padding_side="left")
            out = model.generate(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                                 max_new_tokens=max(answer_budget(n) for n in response_tokens[chunk]), do_sample=False,
                                 temperature=None, top_p=None, top_k=None, use_cache=True, synced_gpus=synced_gpus,
                                 eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
            for ids, n in zip(out[:, batch.input_ids.shape[1]:].tolist(), response_tokens[chunk]):
                text = ids[: next((i for i, t in enumerate(ids) if t in stop), len(ids))]
                answers.append((answer_ends(ids, stop, n), tokenizer.decode(text, skip_special_tokens=True)))
    return answers


class TorchEngine:
    """DeepSpeed's training interface over a plain model and optimizer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None,
                 scheduler=None, accumulation: int = 1):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.max_grad_norm, self.accumulation, self.micro_steps = max_grad_norm, accumulation, 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()  # the window's gradient is the mean of its micro-batches'

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
