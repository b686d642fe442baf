"""A validation split of the synthetic training samples, and the rule that picks a learning rate on it.

TiTok has no data of the task: the only thing to tune a recipe on is the synthetic data it made. So a
``train.validation_fraction`` of the selected samples is held out of training, the trained LoRA's loss
on their kept tokens is measured after every epoch, and under ``train.lr_search`` each candidate
learning rate trains its own LoRA on the same rows and the one with the lowest final validation loss
is the run's adapter. The held-out test split of the task is never read for it.

Written by hand: a seeded split of a few hundred rows and an argmin; Ray Tune would add a scheduler
and trial actors around trainings that already share one Ray Train worker group (``train.ray_train``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["best_lr", "validation_count", "validation_mask"]


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


def best_lr(curves: dict[float, list[float]]) -> float:
    """The learning rate whose LoRA ends with the lowest validation loss (the last value of its
    per-epoch curve); a tie goes to the smaller rate. A candidate that diverged (no curve, or a
    non-finite loss) cannot win; raises ValueError when none is left."""
    finite = {lr: curve[-1] for lr, curve in curves.items() if curve and math.isfinite(curve[-1])}
    if not finite:
        raise ValueError(f"no learning rate of {sorted(curves)} ended with a finite validation loss")
    return min(finite, key=lambda lr: (finite[lr], lr))
