"""Target-aware token selection (an option beside the paper's): which response tokens to teach,
judged against the target base instead of (or as well as) the source amateur.

The paper's excess compares the expert with the *source* base, so text the source base already
predicts (a closing "So the answer is") counts as "not taught by the adapter" and is dropped, even
when the target has never seen that format. ``reference: target_base`` asks instead how much more
the expert likes a span than the target does. The two models tokenize differently, but the
log-probability of a text span is the sum over its tokens under either tokenizer, so over each
aligned group of the character-span alignment (``align.alignment_groups``) the comparison is exact:

    score(group) = sum log P_expert(source tokens of the group) - sum log P_target(target tokens of the group)

Every target token of a group gets its group's score. ``both`` keeps what either reference finds
taught: ``max(target score, source excess of the group)``, where the source excess of a group is
``sum (log P_expert - log P_amateur)`` over its source tokens: both are log-probability differences
over the same span, so they compare directly. The top-k% target tokens by score (per sample) are
trained.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from titok.core.span_transfer import alignment_groups
from titok.choices import REFERENCES, Reference

__all__ = ["REFERENCES", "Reference", "target_token_scores"]


def target_token_scores(source_offsets: Sequence[Sequence[int]], expert_logprobs: Sequence[float],
                        amateur_logprobs: Sequence[float], target_offsets: Sequence[Sequence[int]],
                        target_logprobs: Sequence[float], text_length: int, reference: Reference) -> np.ndarray:
    """One score per target token (see the module docstring); ``reference`` is target_base or both."""
    if reference not in ("target_base", "both"):
        raise ValueError(f"target token scores need reference target_base or both, got {reference!r}")
    expert = np.asarray(expert_logprobs, dtype=np.float64)
    amateur = np.asarray(amateur_logprobs, dtype=np.float64)
    target = np.asarray(target_logprobs, dtype=np.float64)
    scores = np.empty(len(target))
    for group_src, group_tgt in alignment_groups(source_offsets, target_offsets, text_length):
        against_target = expert[group_src].sum() - target[group_tgt].sum()
        if reference == "both":
            against_target = max(against_target, (expert[group_src] - amateur[group_src]).sum())
        scores[group_tgt] = against_target
    return scores
