"""How sure a comparison is: bootstrap intervals over examples and seeds, and a paired test.

Scores are per-example outcomes (1/0 for exact match, a ROUGE-L value for free text) laid out as
(seeds, examples): every seed of a method is evaluated on the same held-out examples, so two methods
can be compared example by example.
- ``bootstrap_interval``: resample seeds and examples with replacement (two-level bootstrap), mean
  of each resample; the 2.5th and 97.5th percentiles are the 95% interval.
- ``paired_test``: the difference of two methods on the same (seed, example) cells; a two-sided
  sign-flip permutation test on the per-example mean differences (exact when there are few
  examples, Monte Carlo otherwise).
- ``significant_from``: that test's critical value, the smallest difference it would call at
  p < 0.05 on the examples where the two disagree as much as they do: what a comparison can resolve
  (a tie with a critical value of 0.10 says nothing about a 0.02 effect).
Hand-written because neither scipy nor the project's other dependencies give a two-level bootstrap,
and scipy is not a dependency.
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["bootstrap_interval", "paired_test", "significant_from"]


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


def _sign_flips(a, b, resamples: int, seed: int) -> tuple[float, np.ndarray | None]:
    """The observed mean difference and the null distribution of |mean difference| (None where the
    two never disagree): each example's seed-mean difference with its sign flipped at random."""
    a, b = _matrix(a), _matrix(b)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have one shape, got {a.shape} and {b.shape}")
    per_example = (a - b).mean(axis=0)
    nonzero = per_example[per_example != 0]
    if len(nonzero) == 0:
        return float(per_example.mean()), None
    if len(nonzero) <= 16:  # every sign pattern: exact
        signs = np.array(list(itertools.product((-1.0, 1.0), repeat=len(nonzero))))
    else:
        signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(resamples, len(nonzero)))
    return float(per_example.mean()), np.abs((signs * nonzero).sum(axis=1) / len(per_example))


def paired_test(a, b, resamples: int = 20000, seed: int = 0) -> tuple[float, float]:
    """``(mean difference a - b, two-sided p-value)`` over paired (seeds, examples) matrices.

    The unit is the example (its difference averaged over seeds): under the null hypothesis each
    example's difference is as likely negative as positive, so its sign is flipped at random.
    """
    observed, null = _sign_flips(a, b, resamples, seed)
    if null is None:
        return observed, 1.0
    return observed, float(np.mean(null >= abs(observed) - 1e-12))


def significant_from(a, b, level: float = 0.05, resamples: int = 20000, seed: int = 0) -> float:
    """The smallest |mean difference| ``paired_test`` would call significant (p < ``level``) with the
    per-example disagreements of ``a`` and ``b``; ``inf`` where no difference could be (too few)."""
    _, null = _sign_flips(a, b, resamples, seed)
    if null is None:
        return float("inf")
    values = np.sort(null)
    beyond = 1.0 - np.searchsorted(values, values - 1e-12, side="left") / len(values)  # P(|F| >= v) for each v
    called = values[beyond < level]
    return float(called.min()) if len(called) else float("inf")
