"""Move per-token values (excess scores, keep masks) from one tokenizer to another by character spans.

Both tokenizations are of the same response text. Each becomes a partition of the text into
consecutive spans (a token ends where its offset ends; whitespace a tokenizer leaves out of its
offsets, such as the space before a word, joins the following token; tokens that share one
character, such as byte-fallback pieces of an emoji, split it equally). A dual pointer then walks
both partitions and closes a group whenever the two cumulative boundaries meet:

- one source token over one or more target tokens: each target token copies its value;
- several source tokens over one or more target tokens: each target token gets their mean weighted
  by characters, so the character-weighted mean of the values over the text is preserved.

Offsets come from the tokenizers (``titok.core.sequences.encode_response``), never from decoding single
tokens and stripping spaces, which breaks on multi-byte characters and on BOS asymmetry. A token
with an empty span (a BOS, an EOS) joins the group where it stands: on the source side it carries
no weight, on the target side it receives that group's value.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from titok.core.sequences import encode_response

__all__ = ["AlignmentError", "align_to_tokenizer", "align_values", "alignment_groups", "token_boundaries"]

_EPS = 1e-9


class AlignmentError(ValueError):
    """Token offsets that cannot describe the given text."""


def token_boundaries(offsets: Sequence[Sequence[int]], text_length: int) -> np.ndarray:
    """(n + 1,) cumulative character boundaries: token i covers [b[i], b[i+1])."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if len(offsets) == 0:
        if text_length:
            raise AlignmentError(
                f"no tokens for a text of {text_length} characters (the tokenizer drops all of them, "
                "e.g. control characters): there is nothing to align"
            )
        return np.zeros(1)
    if (offsets < 0).any() or (offsets[:, 0] > offsets[:, 1]).any() or (offsets[:, 1] > text_length).any():
        raise AlignmentError(f"token offsets do not fit a text of {text_length} characters: {offsets.tolist()[:8]}...")
    if text_length and offsets[:, 1].max() == 0:
        raise AlignmentError("all token offsets are empty: the tokenizer reports no character spans")
    ends = np.maximum.accumulate(offsets[:, 1]).astype(np.float64)
    ends[-1] = text_length  # trailing text a tokenizer leaves uncovered joins the last token
    bounds = np.concatenate([[0.0], ends])
    # Consecutive tokens with one identical non-empty span share it equally.
    i = 0
    while i < len(offsets):
        j = i
        while j + 1 < len(offsets) and (offsets[j + 1] == offsets[i]).all() and offsets[i, 1] > offsets[i, 0]:
            j += 1
        if j > i:
            lo, hi = bounds[i], bounds[j + 1]
            bounds[i + 1 : j + 1] = lo + (hi - lo) * np.arange(1, j - i + 1) / (j - i + 1)
        i = j + 1
    return bounds


def alignment_groups(
    source_offsets: Sequence[Sequence[int]], target_offsets: Sequence[Sequence[int]], text_length: int
) -> list[tuple[list[int], list[int]]]:
    """Dual pointer over both partitions: (source indices, target indices) per aligned group."""
    src, tgt = token_boundaries(source_offsets, text_length), token_boundaries(target_offsets, text_length)
    n_src, n_tgt = len(src) - 1, len(tgt) - 1
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < n_src and j < n_tgt:
        group_src, group_tgt = [i], [j]
        src_end, tgt_end = src[i + 1], tgt[j + 1]
        i, j = i + 1, j + 1
        while abs(src_end - tgt_end) > _EPS:
            if src_end < tgt_end:
                group_src.append(i)
                src_end, i = src[i + 1], i + 1
            else:
                group_tgt.append(j)
                tgt_end, j = tgt[j + 1], j + 1
        groups.append((group_src, group_tgt))
    if groups:  # leftover tokens are empty spans at the very end
        groups[-1][0].extend(range(i, n_src))
        groups[-1][1].extend(range(j, n_tgt))
    elif n_src or n_tgt:
        raise AlignmentError(f"cannot align {n_src} source tokens with {n_tgt} target tokens over an empty text")
    return groups


def align_values(
    source_offsets: Sequence[Sequence[int]],
    source_values: Sequence[float],
    target_offsets: Sequence[Sequence[int]],
    text_length: int,
) -> np.ndarray:
    """Per-target-token values from per-source-token values over the same text (see module doc)."""
    values = np.asarray(source_values, dtype=np.float64)
    if len(values) != len(np.asarray(source_offsets).reshape(-1, 2)):
        raise AlignmentError(f"{len(values)} source values for {len(source_offsets)} source tokens")
    widths = np.diff(token_boundaries(source_offsets, text_length))
    out = np.empty(len(np.asarray(target_offsets).reshape(-1, 2)), dtype=np.float64)
    for group_src, group_tgt in alignment_groups(source_offsets, target_offsets, text_length):
        weight = widths[group_src]
        if len(group_src) == 1:
            out[group_tgt] = values[group_src[0]]
        elif weight.sum() > 0:
            out[group_tgt] = values[group_src] @ weight / weight.sum()
        else:
            out[group_tgt] = values[group_src].mean()
    return out


def align_to_tokenizer(
    text: str,
    source_offsets: Sequence[Sequence[int]],
    source_values: Sequence[float],
    target_tokenizer: PreTrainedTokenizerBase,
) -> tuple[list[int], list[tuple[int, int]], np.ndarray]:
    """Tokenize ``text`` with the target tokenizer and carry the source values onto its tokens."""
    target_ids, target_offsets = encode_response(target_tokenizer, text)
    return target_ids, target_offsets, align_values(source_offsets, source_values, target_offsets, len(text))
