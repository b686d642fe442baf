"""Turn (query, response) text pairs into padded model inputs with a response-token mask.

The prompt (chat template + query) and the response are tokenized separately and concatenated,
so response tokens are known exactly: template tokens (BOS, role headers, the end-of-turn text)
are never counted as response tokens, and every response token has character offsets into the
response text, which cross-tokenizer alignment needs. Training batches (``build_training_batch``)
add one weight per token, so all tokenization for training and scoring lives in this module.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

__all__ = [
    "Batch", "EncodedPair", "OffsetsUnavailableError", "TrainingBatch", "build_training_batch", "collate", "encode_pair",
    "encode_prompt", "encode_response", "format_prompt", "token_matrix",
]


def format_prompt(tokenizer: PreTrainedTokenizerBase, query: str, system: str | None = None) -> str:
    """Chat-formatted prompt text that ends where the assistant's response begins."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": query})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class OffsetsUnavailableError(ValueError):
    """A tokenizer cannot say which characters of the text each token covers."""


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    response_ids: list[int]
    response_offsets: list[tuple[int, int]]  # [start, end) character span in the response text


@dataclass
class Batch:
    """Padded tensors, all (B, T). ``response_mask`` is True at response-token positions."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def logits_start(self) -> int:
        """First position whose logits predict a response token: earlier logits are never needed
        (the vocabulary projection dominates small models' cost, so they are not computed)."""
        return max(int(self.response_mask.float().argmax(dim=1).min()) - 1, 0)

    def logits_to_keep(self) -> torch.Tensor:
        """Positions from ``logits_start()`` on, for the model's ``logits_to_keep``, as an index tensor.

        Not a count: with a count transformers slices the hidden states into a strided view, and
        ``torch.matmul`` folds a strided (B, T, H) input into one matmul only when the weight
        requires grad; a frozen LM head instead runs a batched matmul over B expanded copies of
        itself (Gemma-3-270M, batch 8: 4x slower training steps, +1.8 GB peak memory). Indices make
        transformers gather a contiguous copy of just these positions. On the CPU, so that they index
        the last layer's hidden states on whichever GPU a ``device_map`` put it.
        """
        return torch.arange(self.logits_start(), self.input_ids.shape[1])

    def to(self, device) -> "Batch":
        return type(self)(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                             for f in fields(self)})


def encode_response(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens) and each token's character span in ``text``.

    Fast tokenizers report offsets into the original text, even when they normalize it. Pure-Python
    tokenizers get offsets by decoding growing prefixes, which is only sound when decoding gives the
    text back exactly; one that normalizes (lower-cases, strips accents, collapses spaces) raises
    ``OffsetsUnavailableError``.
    """
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(span) for span in enc["offset_mapping"]]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids) != text:
        raise OffsetsUnavailableError(
            f"{type(tokenizer).__name__} has no offset mapping and does not decode back to the same "
            "text (it normalizes), so token character spans are unknown; use a fast tokenizer"
        )
    offsets, previous_end = [], 0
    for i in range(1, len(ids) + 1):
        end = len(tokenizer.decode(ids[:i]))
        offsets.append((previous_end, max(end, previous_end)))
        previous_end = max(end, previous_end)
    return ids, offsets


def encode_prompt(tokenizer: PreTrainedTokenizerBase, query: str) -> list[int]:
    """The chat-formatted prompt's ids (the template carries its own special tokens)."""
    return tokenizer(format_prompt(tokenizer, query), add_special_tokens=False)["input_ids"]


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    query: str,
    response: str,
    max_length: int | None = None,
    append_eos: bool = False,
) -> EncodedPair:
    """Prompt ids from the chat template, response ids with offsets; the response is cut to fit.

    ``append_eos`` adds the end-of-turn token (``eos_token``, which closes the assistant turn in the
    chat templates we use) after the response, with an empty span: training needs it so that the
    model learns to stop; scoring leaves it out, as it is template, not response.
    """
    prompt_ids = encode_prompt(tokenizer, query)
    response_ids, offsets = encode_response(tokenizer, response)
    if append_eos:
        response_ids, offsets = response_ids + [tokenizer.eos_token_id], offsets + [(len(response), len(response))]
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"prompt is {len(prompt_ids)} tokens, which leaves no room for a response within "
                f"max_length={max_length}: {query[:80]!r}"
            )
        response_ids, offsets = response_ids[:room], offsets[:room]
    return EncodedPair(list(prompt_ids), response_ids, offsets)


def collate(pairs: list[EncodedPair], pad_token_id: int, padding_side: str = "left") -> Batch:
    """Pad a list of pairs. ``position_ids`` count real tokens only, so padding never shifts them."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(p.prompt_ids) + len(p.response_ids) for p in pairs)
    input_ids = torch.full((len(pairs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    response_mask = torch.zeros((len(pairs), width), dtype=torch.bool)
    for row, pair in enumerate(pairs):
        ids = pair.prompt_ids + pair.response_ids
        start = width - len(ids) if padding_side == "left" else 0
        input_ids[row, start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, start : start + len(ids)] = 1
        response_mask[row, start + len(pair.prompt_ids) : start + len(ids)] = True
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return Batch(input_ids, attention_mask, position_ids, response_mask)


@dataclass
class TrainingBatch(Batch):
    """A right-padded ``Batch`` plus (B, T) token weights for ``selective_cross_entropy`` and, for
    logit distillation (``titok.core.distill``), (B, T, n) teacher top-n log-probs, NaN where none."""

    token_weights: torch.Tensor
    teacher_top: torch.Tensor | None = None


def build_training_batch(
    tokenizer: PreTrainedTokenizerBase,
    queries: list[str],
    responses: list[str],
    response_weights: list,
    max_length: int | None = None,
    teacher_top: list | None = None,
) -> TrainingBatch:
    """Tokenize pairs for the target model; ``response_weights[i]`` has one weight per target response token.

    The end-of-turn token after each response is always trained (weight 1), so the target learns
    where an answer ends; it is not a scored token, so no filter weight exists for it (nor a teacher
    distribution). ``teacher_top[i]``: (target response tokens, n) teacher log-probs, NaN rows where
    none, or None for a sample without them.
    """
    pairs = [encode_pair(tokenizer, q, r, max_length, append_eos=True) for q, r in zip(queries, responses)]
    batch = collate(pairs, tokenizer.pad_token_id, padding_side="right")
    token_weights = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
    for row, (pair, response, weights) in enumerate(zip(pairs, responses, response_weights)):
        weights = torch.as_tensor(weights, dtype=torch.float32)
        n_text = len(encode_response(tokenizer, response)[0])
        if len(weights) != n_text:
            raise ValueError(
                f"sample {row}: {len(weights)} token weights for {n_text} response tokens; "
                "weights must be aligned to the target tokenizer first"
            )
        # max_length may have cut the response (and its end-of-turn token): keep the weights that fit
        token_weights[row, batch.response_mask[row]] = torch.cat([weights, torch.ones(1)])[: len(pair.response_ids)]
    return TrainingBatch(batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_mask, token_weights,
                         None if teacher_top is None else _teacher_tensor(batch, response_weights, teacher_top))


def token_matrix(rows) -> np.ndarray:
    """A (tokens, n) float32 matrix from a stored list-of-lists cell (Arrow and Ray Data hand it over as
    an object array of arrays, which ``np.asarray`` cannot stack)."""
    return np.stack([np.asarray(r, dtype=np.float32) for r in rows]) if len(rows) else np.zeros((0, 0), np.float32)


def _teacher_tensor(batch: Batch, response_weights: list, teacher_top: list) -> torch.Tensor:
    """(B, T, n) teacher log-probs at each sample's response positions, NaN elsewhere."""
    tops = [None if t is None or not len(t) else token_matrix(t) for t in teacher_top]
    n = next((t.shape[1] for t in tops if t is not None), 1)
    out = torch.full((*batch.input_ids.shape, n), float("nan"), dtype=torch.float32)
    for row, (weights, top) in enumerate(zip(response_weights, tops)):
        if top is None:
            continue
        if len(top) != len(weights):
            raise ValueError(f"sample {row}: teacher log-probs for {len(top)} tokens, weights for {len(weights)}")
        positions = batch.response_mask[row].nonzero()[:, 0][: len(weights)]  # the end-of-turn token has none
        out[row, positions] = torch.as_tensor(top[: len(positions)])
    return out
