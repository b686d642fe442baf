"""Logit-level distillation across tokenizers: the ULD loss on the expert's stored top-n log-probs.

ULD (Boizard et al., 2024, arXiv 2402.12030) compares two next-token distributions over different
vocabularies by sorting each one's probabilities and taking the L1 distance between the sorted
vectors (the Wasserstein-1 distance once the token identities are dropped); training adds it to the
cross-entropy on the teacher's text: ``loss = CE + distill_weight * ULD`` (ULD's and TRL's GOLD's
defaults weigh both 1).

What titok changes, and why it is written here rather than taken from TRL:
- **The teacher is not loaded at training time.** TRL's ``GOLDTrainer`` runs the teacher model next
  to the student inside a ``transformers.Trainer`` (its own loop, teacher and student on one device
  set). titok trains under Ray Train + DeepSpeed ZeRO on targets up to 70B, and the expert (source
  base + LoRA) has already run once, in the labels stage: that stage keeps the expert's **top-n
  log-probs** at every answer token (``labels.top_logprobs``), sorted, which is all ULD reads, since
  it drops token identities. Training then costs what kd's costs, plus a top-n over each position's
  vocabulary.
- **Truncated to the top n.** With the teacher's top n only, the distance is
  ``sum_i<n |p_s[i] - p_t[i]| + |tail_s - tail_t|``: both sorted top-n vectors, then the mass
  outside them (the student's tail is ``1 - sum(top n)``, the teacher's the same of its stored
  values). By the triangle inequality the tail term is a lower bound of the full distance over the
  rest of the vocabulary, and with n = 20 the rest holds little mass on a trained expert's answers.
- **Positions paired by characters, not by index.** ULD pairs the i-th teacher token with the i-th
  student token. titok already aligns both tokenizations by character spans (``titok.core.span_transfer``): in
  each aligned group (source tokens and target tokens covering the same characters) the group's
  first source token's distribution and the group's first target token's prediction are both "what
  comes next at this character", so they are paired there (GOLD's token groups do the same; GOLD
  then also matches the tokens both vocabularies share, which needs token identities). The other
  target tokens of a group get cross-entropy only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from titok.core.span_transfer import alignment_groups
from titok.core.excess import top_logprobs
from titok.core.sequences import token_matrix

__all__ = ["teacher_for_target", "uld_distance"]

def uld_distance(student_logits: torch.Tensor, teacher_top: torch.Tensor) -> torch.Tensor:
    """(N,) ULD distance of each student position (logits (N, V)) to the teacher's sorted top-n
    log-probs (N, n): sorted top-n probabilities compared one by one, plus the two tails' mass."""
    n = teacher_top.shape[-1]
    student = top_logprobs(student_logits, min(n, student_logits.shape[-1])).exp()
    teacher = teacher_top.float().exp()
    if student.shape[-1] < n:  # a student vocabulary smaller than n: its missing ranks have probability 0
        student = torch.nn.functional.pad(student, (0, n - student.shape[-1]))
    head = (student - teacher).abs().sum(dim=-1)
    tail = ((1 - student.sum(dim=-1)).clamp(min=0) - (1 - teacher.sum(dim=-1)).clamp(min=0)).abs()
    return head + tail


def teacher_for_target(source_offsets: Sequence[Sequence[int]], source_top: np.ndarray,
                       target_offsets: Sequence[Sequence[int]], text_length: int) -> np.ndarray:
    """(R_target, n) teacher top-n log-probs per target token: the group's first source token's for
    the first target token of each aligned group, NaN for every other target token (no pairing)."""
    source_top = token_matrix(source_top)
    out = np.full((len(np.asarray(target_offsets).reshape(-1, 2)), source_top.shape[1]), np.nan, dtype=np.float32)
    for group_src, group_tgt in alignment_groups(source_offsets, target_offsets, text_length):
        out[group_tgt[0]] = source_top[group_src[0]]
    return out
