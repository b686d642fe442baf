"""The comparison's interval and paired test on hand-made cases with known answers."""

import numpy as np
import pytest

from titok.core.stats import bootstrap_interval, paired_test, significant_from


def test_an_interval_around_a_constant_is_the_constant():
    assert bootstrap_interval(np.ones((3, 20))) == (1.0, 1.0, 1.0)


def test_the_interval_holds_the_mean_and_narrows_with_more_examples():
    rng = np.random.default_rng(1)
    small = rng.random((3, 20)) < 0.5
    large = rng.random((3, 2000)) < 0.5
    mean, low, high = bootstrap_interval(small)
    assert low < mean < high
    _, big_low, big_high = bootstrap_interval(large)
    assert big_high - big_low < (high - low) / 4
    assert big_low < 0.5 < big_high  # the true rate


def test_seed_to_seed_spread_widens_the_interval():
    steady = np.tile((np.arange(50) % 2)[None, :], (3, 1)).astype(float)  # every seed the same: 0.5
    shaky = np.stack([np.ones(50), np.zeros(50), (np.arange(50) % 2).astype(float)])  # seeds at 1, 0, 0.5
    assert steady.mean() == shaky.mean() == 0.5
    width = lambda scores: np.subtract(*bootstrap_interval(scores)[2:0:-1])  # noqa: E731
    assert width(shaky) > 3 * width(steady)


def test_paired_test_exact_case():
    # 5 examples, A wins on all 5 (one seed): the only sign patterns as extreme are all + or all -
    a, b = np.ones((1, 5)), np.zeros((1, 5))
    difference, p = paired_test(a, b)
    assert difference == 1.0 and p == pytest.approx(2 / 32)


def test_paired_test_sees_no_difference_where_there_is_none():
    a = np.array([[1, 0, 1, 0, 1, 1]])
    difference, p = paired_test(a, a.copy())
    assert difference == 0.0 and p == 1.0
    b = np.array([[0, 1, 1, 0, 1, 1]])  # one win each way
    assert paired_test(a, b) == (0.0, 1.0)


def test_paired_test_on_many_examples_detects_a_real_gap():
    rng = np.random.default_rng(0)
    base = rng.random((3, 400)) < 0.4
    better = base | (rng.random((3, 400)) < 0.2)  # A = B plus extra successes
    difference, p = paired_test(better, base)
    assert difference > 0.1 and p < 0.001
    assert paired_test(base, better)[1] == p  # two-sided


def test_shapes_must_pair():
    with pytest.raises(ValueError, match="one shape"):
        paired_test(np.ones((2, 5)), np.ones((3, 5)))


def test_significant_from_is_where_the_paired_test_starts_calling_a_difference():
    """The critical value agrees with the test it belongs to: every pair's difference is significant
    exactly when it reaches it (exact and Monte Carlo cases, one seed and three)."""
    rng = np.random.default_rng(1)
    for n_seeds, n_examples, rate in [(1, 12, 0.4), (1, 100, 0.15), (3, 100, 0.1), (2, 60, 0.3)]:
        base = (rng.random((n_seeds, n_examples)) < 0.5).astype(float)
        for _ in range(6):
            other = np.where(rng.random(base.shape) < rate, 1 - base, base)  # disagree on ~rate of the cells
            difference, p = paired_test(other, base)
            assert (p < 0.05) == (abs(difference) >= significant_from(other, base) - 1e-12), (n_seeds, n_examples, difference, p)


def test_significant_from_in_hand_cases():
    # 5 wins of 5: the all-+ and all- patterns already have p = 2/32 >= 0.05, so nothing could be called
    assert significant_from(np.ones((1, 5)), np.zeros((1, 5))) == float("inf")
    # 6 of 6: p = 2/64, so only the full difference (1.0) is significant
    assert significant_from(np.ones((1, 6)), np.zeros((1, 6))) == 1.0
    assert significant_from(np.ones((1, 6)), np.ones((1, 6))) == float("inf")  # they never disagree
    # more examples with the same disagreements resolve less: the value is a mean over all of them
    few, many = np.zeros((1, 100)), np.zeros((1, 200))
    few[0, :20] = many[0, :20] = 1
    assert significant_from(many, np.zeros((1, 200))) == pytest.approx(significant_from(few, np.zeros((1, 100))) / 2)
