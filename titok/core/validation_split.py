"""A validation split of the synthetic training samples, and the rule that picks a learning rate on it.

TiTok has no data of the task: the only thing to tune a recipe on is the synthetic data it made. So a
``train.validation_fraction`` of the selected samples is held out of training, the trained LoRA's loss
on their kept tokens is measured after every epoch, and under ``train.lr_search`` each candidate
learning rate trains its own LoRA on the same rows and the one with the lowest final validation loss
is the run's adapter. The held-out test split of the task is never read for it.

Teacher-forced loss cannot see a LoRA that loops: on boolean_expressions (Gemma-3-270M, seed 0) uld's
1e-2 beat 3e-3 by 0.003 of validation loss and then answered 107 of 200 test questions, the rest
repeating a phrase until the token budget ran out. So the trained LoRA also answers some held-out
queries (``train.validation_generations``) and a rate whose answers end on clearly fewer of them than
another rate's cannot win (``ruled_out``): that adapter ended 5 of 32 held-out answers, 3e-3 all 32.

Written by hand: a seeded split of a few hundred rows and an argmin; Ray Tune would add a scheduler
and trial actors around trainings that already share one Ray Train worker group (``train.ray_train``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ENDS_TOLERANCE", "answer_budget", "answer_ends", "best_lr", "ruled_out", "validation_count",
           "validation_mask"]

# a rate is ruled out when its held-out answers end on more than this share fewer queries than the best rate's
ENDS_TOLERANCE = 0.1


def validation_count(rows: int, fraction: float) -> int:
    """How many of ``rows`` samples are held out: ``fraction`` of them, rounded, at least one when the
    fraction is above zero, and never all of them."""
    if fraction <= 0.0 or rows < 2:
        return 0
    return min(max(1, round(fraction * rows)), rows - 1)


def validation_mask(rows: int, fraction: float, seed: int) -> np.ndarray:
    """True for the held-out rows among ``rows`` samples (in the caller's fixed order, e.g. by sample
    id): a seeded draw, so every worker, every candidate and a resumed run hold out the same rows."""
    mask = np.zeros(rows, dtype=bool)
    held_out = validation_count(rows, fraction)
    if held_out:
        mask[np.random.default_rng([seed, 7919]).permutation(rows)[:held_out]] = True
    return mask


def answer_budget(response_tokens: int) -> int:
    """New tokens a held-out answer may take and still count as ending: twice the expert's response
    (in target tokens) and 16 more, so a rationale somewhat longer than the expert's ends and a loop does not."""
    return 2 * response_tokens + 16


def answer_ends(generated: list[int], stop_ids: list[int], response_tokens: int) -> bool:
    """Whether a generated answer (new token ids) ends (one of ``stop_ids``) within ``answer_budget``."""
    return any(token in stop_ids for token in generated[: answer_budget(response_tokens)])


def ruled_out(ends: dict[float, float | None], tolerance: float = ENDS_TOLERANCE) -> set[float]:
    """The rates whose held-out answers end on more than ``tolerance`` fewer queries (a share) than the
    best rate's. ``ends``: each rate's share of held-out answers that end; None where not checked (a
    rate kept from a run without the check, one that diverged), which rules nothing out."""
    checked = {lr: share for lr, share in ends.items() if share is not None}
    if not checked:
        return set()
    best = max(checked.values())
    return {lr for lr, share in checked.items() if share < best - tolerance - 1e-9}


def best_lr(curves: dict[float, list[float]], ends: dict[float, float | None] | None = None) -> float:
    """The learning rate whose LoRA ends with the lowest validation loss (the last value of its
    per-epoch curve) among those ``ruled_out`` leaves (``ends``: each rate's share of held-out answers
    that end); a tie goes to the smaller rate. A candidate that diverged (no curve, or a non-finite
    loss) cannot win; raises ValueError when none is left."""
    finite = {lr: curve[-1] for lr, curve in curves.items() if curve and math.isfinite(curve[-1])}
    out = ruled_out({lr: (ends or {}).get(lr) for lr in finite})  # among the rates that finished
    finite = {lr: loss for lr, loss in finite.items() if lr not in out}
    if not finite:
        raise ValueError(f"no learning rate of {sorted(curves)} ended with a finite validation loss")
    return min(finite, key=lambda lr: (finite[lr], lr))
