"""Contrastive excess: how much more the expert (base + LoRA) likes each response token than the
amateur (the same base without the LoRA).

    S(y_i) = log P_expert(y_i | q, y_<i) - log P_amateur(y_i | q, y_<i)

One copy of the base weights serves both: the expert pass runs the PEFT model as is, the amateur
pass runs it inside ``disable_adapter()``. Only response tokens are scored, and only where it counts:
- logits only at positions that predict a response token (``lm_head_only_at``: the LM head runs on
  those hidden states alone);
- log-probabilities of the actual tokens as ``logit - logsumexp`` in fp32 chunks, never a full fp32
  log-softmax over the vocabulary (Gemma's is 262k wide);
- batches by a token budget over length-sorted pairs (``max_batch_tokens``), so short pairs are not
  padded to the longest;
- the expert pass only for pairs whose expert log-probs are not known yet: the labels stage keeps
  the log-prob of every token the expert generated, so the scores stage runs the amateur alone.
- ``mixed_batch``: the amateur and expert rows of a batch in one forward, PEFT choosing the adapter
  per row (``adapter_names``, ``"__base__"`` for the amateur). Off by default: on CPUs it measured no
  faster than two passes (``bench/results/scoring.json``, ``titok_two_pass_mixed``).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedTokenizerBase

from titok.core.sequences import Batch, EncodedPair, collate, encode_pair

__all__ = ["TokenScores", "response_logprobs", "response_scores", "score_batch", "score_pairs", "text_logprobs",
           "token_budget_batches", "token_logprobs", "top_logprobs"]

_CHUNK_ELEMENTS = 1 << 24  # fp32 values per log-sum-exp chunk (64 MB)


@dataclass
class TokenScores:
    """Per-response-token arrays for one (query, response) pair, all of length R."""

    token_ids: np.ndarray  # int64
    offsets: np.ndarray  # (R, 2) int64, character spans in the response text
    expert_logprobs: np.ndarray  # float32
    amateur_logprobs: np.ndarray  # float32
    expert_top: np.ndarray | None = None  # (R, n) the expert's n likeliest log-probs, where its pass ran here

    @property
    def excess(self) -> np.ndarray:
        return self.expert_logprobs - self.amateur_logprobs


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., target]`` in fp32, as ``logit[target] - logsumexp(logits)``.

    logits: (..., V) in any float dtype; targets: (...) int64. Rows are upcast a chunk at a time, so
    memory is one chunk of fp32 logits, not a full-vocabulary fp32 copy of all of them.
    """
    vocab = logits.shape[-1]
    flat, flat_targets = logits.reshape(-1, vocab), targets.reshape(-1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start : start + rows].float()
        picked = chunk.gather(-1, flat_targets[start : start + rows, None])[:, 0]
        out[start : start + rows] = picked - torch.logsumexp(chunk, dim=-1)
    return out.view(targets.shape)


def top_logprobs(logits: torch.Tensor, n: int) -> torch.Tensor:
    """(N, n) log-probs of each row's n likeliest tokens, in decreasing order, in fp32 chunks (no
    full-vocabulary fp32 copy of every row at once). Differentiable: the student's side of ULD."""
    logits = logits.reshape(-1, logits.shape[-1])
    rows = max(1, _CHUNK_ELEMENTS // logits.shape[-1])
    parts = []
    for start in range(0, logits.shape[0], rows):
        chunk = logits[start : start + rows].float()
        parts.append(chunk.topk(n, dim=-1).values - torch.logsumexp(chunk, dim=-1, keepdim=True))
    return torch.cat(parts) if parts else logits.new_zeros((0, n), dtype=torch.float32)


@contextmanager
def lm_head_only_at(model: torch.nn.Module, positions: torch.Tensor):
    """Run the LM head on the hidden states where ``positions`` (B, W: the first W of the W + 1
    positions the model keeps) is True only, as one (1, N, H) row, so the forward's logits are
    (1, N, V): the vocabulary projection and its log-sum-exp (or cross-entropy and its backward) cost
    per position, and left-padded rows of unequal answer lengths would otherwise pay for every
    position from the longest answer's start. A pre-hook on the output embeddings, so whatever the
    model does to the logits afterwards (Gemma-2's soft-capping) still happens. Yields a dict whose
    ``"gathered"`` says whether it did; where it did not (a model that computes logits some other
    way, or did not keep the W + 1 positions asked for) the caller masks full logits instead.
    """
    state = {"gathered": False}

    def gather(module, args):
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[:2] != (positions.shape[0], positions.shape[1] + 1):
            return None
        state["gathered"] = True
        return (hidden[:, :-1][positions.to(hidden.device)].unsqueeze(0), *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        yield state
    finally:
        handle.remove()


@torch.no_grad()
def response_logprobs(model: torch.nn.Module, batch: Batch, **forward_kwargs) -> list[torch.Tensor]:
    """log P(token | prefix) for each sequence's response tokens: a list of B float32 tensors."""
    return response_scores(model, batch, **forward_kwargs)[0]


@torch.no_grad()
def response_scores(model: torch.nn.Module, batch: Batch, top_n: int = 0,
                    **forward_kwargs) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """``response_logprobs`` and, with ``top_n``, each response token's n likeliest log-probs, (R, n)
    per sequence, from the same logits (what logit distillation reads: ``titok.core.distill``)."""
    batch = batch.to(model.get_input_embeddings().weight.device)  # the first GPU under a device_map
    keep_from = batch.logits_start()
    # logits at kept position j predict input token keep_from + j + 1
    targets, predicts_response = batch.input_ids[:, keep_from + 1 :], batch.response_mask[:, keep_from + 1 :]
    # PEFT's mixed batch picks an adapter per row: a LoRA on the LM head needs the head's rows intact
    per_row_head = "adapter_names" in forward_kwargs and isinstance(model.get_output_embeddings(), LoraLayer)
    with nullcontext({"gathered": False}) if per_row_head else lm_head_only_at(model, predicts_response) as head:
        logits = model(**batch.model_inputs(), logits_to_keep=batch.logits_to_keep(), **forward_kwargs).logits
    counts = predicts_response.sum(dim=1).tolist()
    if head["gathered"]:
        flat_logits = logits[0]
        flat = token_logprobs(flat_logits, targets[predicts_response].to(logits.device))
    else:
        flat_logits = logits[:, :-1][predicts_response.to(logits.device)]
        flat = token_logprobs(flat_logits, targets[predicts_response].to(logits.device))
    tops = list(top_logprobs(flat_logits, top_n).split(counts)) if top_n else None
    return list(flat.split(counts)), tops


def text_logprobs(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, queries: list[str], responses: list[str],
                  batch_size: int = 16) -> list[np.ndarray]:
    """One model's log-probs of each response's tokens after its chat prompt, ``batch_size`` pairs
    per forward (left padding): what option choices and a target-aware reference both need."""
    pairs = [encode_pair(tokenizer, q, r) for q, r in zip(queries, responses, strict=True)]
    out: list[np.ndarray] = []
    for start in range(0, len(pairs), batch_size):
        chunk = collate(pairs[start : start + batch_size], tokenizer.pad_token_id, "left")
        out += [lp.float().cpu().numpy() for lp in response_logprobs(model, chunk)]
    return out


def score_batch(model: PeftModel, pairs: list[EncodedPair], pad_token_id: int, padding_side: str = "left",
                known_expert: list[np.ndarray | None] | None = None, mixed_batch: bool = False,
                top_n: int = 0) -> list[TokenScores]:
    """Expert and amateur log-probs of one padded batch, with a single copy of the base weights.

    ``known_expert[i]``, when given, are pair i's expert log-probs already (from generation): the
    expert pass then runs only for the pairs without them. ``mixed_batch``: both passes in one forward.
    ``top_n``: where the expert pass runs, the expert's n likeliest log-probs at each token too.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"the expert must be a peft.PeftModel (base + source adapter), got {type(model).__name__}")
    known = known_expert or [None] * len(pairs)
    unknown = [i for i, k in enumerate(known) if k is None]
    expert: list = list(known)
    tops: list = [None] * len(pairs)
    if mixed_batch and unknown:
        rows = pairs + [pairs[i] for i in unknown]
        names = ["__base__"] * len(pairs) + [model.active_adapter] * len(unknown)
        scored, top = response_scores(model, collate(rows, pad_token_id, padding_side), top_n, adapter_names=names)
        amateur, unknown_expert, unknown_top = scored[: len(pairs)], scored[len(pairs) :], (top or [])[len(pairs) :]
    else:
        with model.disable_adapter():
            amateur = response_logprobs(model, collate(pairs, pad_token_id, padding_side))
        unknown_expert, unknown_top = response_scores(model, collate([pairs[i] for i in unknown], pad_token_id, padding_side),
                                                      top_n) if unknown else ([], None)
    for i, lp in zip(unknown, unknown_expert):
        expert[i] = lp.cpu().numpy()
    for i, top in zip(unknown, unknown_top or []):
        tops[i] = top.cpu().numpy()
    return [
        TokenScores(
            token_ids=np.asarray(pair.response_ids, dtype=np.int64),
            offsets=np.asarray(pair.response_offsets, dtype=np.int64).reshape(-1, 2),
            expert_logprobs=np.asarray(e, dtype=np.float32),
            amateur_logprobs=a.cpu().numpy(),
            expert_top=top,
        )
        for pair, e, a, top in zip(pairs, expert, amateur, tops)
    ]


def token_budget_batches(lengths: list[int], max_rows: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices in batches over length-sorted sequences: at most ``max_rows`` rows and, when given,
    ``max_tokens`` padded tokens (rows x longest) per batch; a sequence longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for i in order:
        longest = max([lengths[j] for j in current] + [lengths[i]])
        if current and (len(current) == max_rows or (max_tokens and longest * (len(current) + 1) > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


def score_pairs(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    queries: list[str],
    responses: list[str],
    batch_size: int = 8,
    padding_side: str = "left",
    max_length: int | None = None,
    max_batch_tokens: int | None = None,
    known_expert: list[np.ndarray | None] | None = None,
    mixed_batch: bool = False,
    top_n: int = 0,
) -> list[TokenScores]:
    """Score (query, response) pairs in length-sorted batches (``batch_size`` rows, ``max_batch_tokens``)."""
    if len(queries) != len(responses):
        raise ValueError(f"{len(queries)} queries but {len(responses)} responses")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = [encode_pair(tokenizer, q, r, max_length) for q, r in zip(queries, responses)]
    known = known_expert or [None] * len(pairs)
    for i, (pair, k) in enumerate(zip(pairs, known)):
        if k is not None and len(k) != len(pair.response_ids):
            known[i] = None  # cut by max_length, or another tokenization: score it here
    results: list[TokenScores | None] = [None] * len(pairs)
    lengths = [len(p.prompt_ids) + len(p.response_ids) for p in pairs]
    for chunk in token_budget_batches(lengths, batch_size, max_batch_tokens):
        scored = score_batch(model, [pairs[i] for i in chunk], tokenizer.pad_token_id, padding_side, [known[i] for i in chunk],
                             mixed_batch, top_n)
        for i, item in zip(chunk, scored):
            results[i] = item
    return results
