"""Contrastive excess: how much more the expert (base + LoRA) likes each response token than the
amateur (the same base without the LoRA).

    S(y_i) = log P_expert(y_i | q, y_<i) - log P_amateur(y_i | q, y_<i)

One copy of the base weights serves both: the expert pass runs the PEFT model as is, the amateur
pass runs it inside ``disable_adapter()``. Only response tokens are scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from titok.sequences import Batch, EncodedPair, collate, encode_pair

__all__ = ["TokenScores", "response_logprobs", "score_batch", "score_pairs"]


@dataclass
class TokenScores:
    """Per-response-token arrays for one (query, response) pair, all of length R."""

    token_ids: np.ndarray  # int64
    offsets: np.ndarray  # (R, 2) int64, character spans in the response text
    expert_logprobs: np.ndarray  # float32
    amateur_logprobs: np.ndarray  # float32

    @property
    def excess(self) -> np.ndarray:
        return self.expert_logprobs - self.amateur_logprobs


@torch.no_grad()
def response_logprobs(model: torch.nn.Module, batch: Batch) -> list[torch.Tensor]:
    """log P(token | prefix) for each sequence's response tokens: a list of B float32 tensors.

    Logits are computed only from the first position that predicts a response token onwards
    (``logits_to_keep``), which bounds memory for large vocabularies.
    """
    batch = batch.to(model.get_input_embeddings().weight.device)  # the first GPU under a device_map
    keep_from = batch.logits_start()
    logits = model(**batch.model_inputs(), logits_to_keep=batch.input_ids.shape[1] - keep_from).logits
    # logits[:, j] predicts input token keep_from + j + 1
    predicted = batch.input_ids[:, keep_from + 1 :]
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, predicted.unsqueeze(-1)).squeeze(-1)
    mask = batch.response_mask[:, keep_from + 1 :]
    return [row[row_mask] for row, row_mask in zip(logprobs, mask)]


def score_batch(model: PeftModel, pairs: list[EncodedPair], pad_token_id: int, padding_side: str = "left") -> list[TokenScores]:
    """Expert and amateur log-probs of one padded batch, with a single copy of the base weights."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"the expert must be a peft.PeftModel (base + source adapter), got {type(model).__name__}")
    batch = collate(pairs, pad_token_id, padding_side)
    expert = response_logprobs(model, batch)
    with model.disable_adapter():
        amateur = response_logprobs(model, batch)
    return [
        TokenScores(
            token_ids=np.asarray(pair.response_ids, dtype=np.int64),
            offsets=np.asarray(pair.response_offsets, dtype=np.int64).reshape(-1, 2),
            expert_logprobs=e.cpu().numpy(),
            amateur_logprobs=a.cpu().numpy(),
        )
        for pair, e, a in zip(pairs, expert, amateur)
    ]


def score_pairs(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    queries: list[str],
    responses: list[str],
    batch_size: int = 8,
    padding_side: str = "left",
    max_length: int | None = None,
) -> list[TokenScores]:
    """Score (query, response) pairs in batches; sequences are sorted by length to waste little padding."""
    if len(queries) != len(responses):
        raise ValueError(f"{len(queries)} queries but {len(responses)} responses")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = [encode_pair(tokenizer, q, r, max_length) for q, r in zip(queries, responses)]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt_ids) + len(pairs[i].response_ids))
    results: list[TokenScores | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        scored = score_batch(model, [pairs[i] for i in chunk], tokenizer.pad_token_id, padding_side)
        for i, item in zip(chunk, scored):
            results[i] = item
    return results
