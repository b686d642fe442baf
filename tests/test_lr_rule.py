"""bench/lr_rule.py: the one-standard-error rule over paired per-sample validation losses, on hand
cases (the note on what the config's argmin rule picked on boolean_expressions rests on it)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_SPEC = importlib.util.spec_from_file_location("lr_rule", Path(__file__).parents[1] / "bench" / "lr_rule.py")
lr_rule = sys.modules["lr_rule"] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(lr_rule)


def test_a_rate_within_one_standard_error_of_the_argmin_wins_when_smaller():
    # 1e-2 is lowest by 0.01 on average, but the samples disagree (+0.03, -0.05, ...): within noise
    weights = np.ones(4)
    losses = {1e-3: np.array([0.9, 0.9, 0.9, 0.9]),
              3e-3: np.array([0.53, 0.45, 0.52, 0.50]),
              1e-2: np.array([0.50, 0.50, 0.50, 0.46])}
    chosen, gaps = lr_rule.one_se_lr(losses, weights)
    assert chosen == 3e-3
    gap, se = gaps[3e-3]
    d = losses[3e-3] - losses[1e-2]
    assert gap == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / 2)  # sqrt(4) samples
    assert gaps[1e-3][0] == pytest.approx(0.41) and gaps[1e-2] == (0.0, 0.0)


def test_a_clear_gain_keeps_the_argmin_and_samples_weigh_by_their_kept_tokens():
    # every sample 0.1 lower at 1e-2: a difference with no spread is never within its (zero) error
    losses = {1e-3: np.array([0.6, 0.7, 0.8]), 1e-2: np.array([0.5, 0.6, 0.7])}
    assert lr_rule.one_se_lr(losses, np.array([1.0, 2.0, 3.0]))[0] == 1e-2
    # a sample of 9 kept tokens outweighs one of 1: the weighted mean prefers 1e-3
    losses = {1e-3: np.array([0.2, 1.0]), 1e-2: np.array([0.4, 0.5])}
    chosen, gaps = lr_rule.one_se_lr(losses, np.array([9.0, 1.0]))
    assert chosen == 1e-3 and gaps[1e-2][0] == pytest.approx((9 * 0.2 + 1 * -0.5) / 10)
