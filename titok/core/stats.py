"""How sure a comparison is: bootstrap intervals over examples and seeds, and a paired test.

Scores are per-example outcomes (1/0 for exact match, a ROUGE-L value for free text) laid out as
(seeds, examples): every seed of a method is evaluated on the same held-out examples, so two methods
can be compared example by example.
- ``bootstrap_interval``: resample seeds and examples with replacement (two-level bootstrap), mean
  of each resample; the 2.5th and 97.5th percentiles are the 95% interval.
- ``paired_test``: the difference of two methods on the same (seed, example) cells; a two-sided
  sign-flip permutation test on the per-example mean differences (exact when there are few
  examples, Monte Carlo otherwise). Hand-written because neither scipy nor the project's other
  dependencies give a two-level bootstrap, and scipy is not a dependency.
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["bootstrap_interval", "paired_test"]


def _matrix(scores) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim == 1:
        values = values[None, :]
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"scores must be (seeds, examples), got shape {values.shape}")
    return values


def bootstrap_interval(scores, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)`` of a (seeds, examples) matrix; seeds and examples both resampled."""
    values = _matrix(scores)
    rng = np.random.default_rng(seed)
    n_seeds, n_examples = values.shape
    seeds = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    examples = rng.integers(0, n_examples, size=(resamples, n_examples))
    means = np.array([values[np.ix_(s, e)].mean() for s, e in zip(seeds, examples)])
    tail = (1 - level) / 2
    return float(values.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_test(a, b, resamples: int = 20000, seed: int = 0) -> tuple[float, float]:
    """``(mean difference a - b, two-sided p-value)`` over paired (seeds, examples) matrices.

    The unit is the example (its difference averaged over seeds): under the null hypothesis each
    example's difference is as likely negative as positive, so its sign is flipped at random.
    """
    a, b = _matrix(a), _matrix(b)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have one shape, got {a.shape} and {b.shape}")
    per_example = (a - b).mean(axis=0)
    observed = per_example.mean()
    nonzero = per_example[per_example != 0]
    if len(nonzero) == 0:
        return float(observed), 1.0
    if len(nonzero) <= 16:  # every sign pattern: exact
        signs = np.array(list(itertools.product((-1.0, 1.0), repeat=len(nonzero))))
    else:
        signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(resamples, len(nonzero)))
    flipped = (signs * nonzero).sum(axis=1) / len(per_example)
    p = float(np.mean(np.abs(flipped) >= abs(observed) - 1e-12))
    return float(observed), p
