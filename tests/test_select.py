import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from titok.core.select import keep_count, sample_scores, select_tokens, top_m_samples


def test_sample_scores_are_means_and_empty_is_minus_inf():
    scores = sample_scores([np.array([1.0, 3.0]), np.array([]), np.array([-2.0])])
    assert scores.tolist() == [2.0, -np.inf, -2.0]


def test_top_m_hand_computed_with_ties_in_input_order():
    scores = np.array([0.5, 2.0, 0.5, 3.0, 2.0])
    assert top_m_samples(scores, 3).tolist() == [3, 1, 4]
    assert top_m_samples(scores, 5).tolist() == [3, 1, 4, 0, 2]


@pytest.mark.parametrize("m", [0, -1, 2.5, True])
def test_bad_m_is_rejected(m):
    with pytest.raises(ValueError, match="M must be an integer >= 1"):
        top_m_samples(np.array([1.0, 2.0]), m)


def test_m_larger_than_pool_is_rejected():
    with pytest.raises(ValueError, match="M=3 is larger than the pool of 2"):
        top_m_samples(np.array([1.0, 2.0]), 3)


@pytest.mark.parametrize("k", [0, -0.1, 1.5, float("nan")])
def test_bad_k_is_rejected(k):
    with pytest.raises(ValueError, match=r"k must be in \(0, 1\]"):
        select_tokens([np.array([1.0])], k)


def test_keep_count_rounds_up_without_float_noise():
    assert keep_count(10, 0.7) == 7
    assert keep_count(3, 0.7) == 3  # ceil(2.1)
    assert keep_count(1, 0.01) == 1
    assert keep_count(0, 0.5) == 0


def test_per_sample_hand_computed():
    masks = select_tokens([np.array([0.1, 0.9, 0.5, 0.5]), np.array([2.0, -1.0])], k=0.5, scope="per_sample")
    assert [m.tolist() for m in masks] == [[False, True, True, False], [True, False]]


def test_per_batch_ranks_within_groups():
    excess = [np.array([5.0, 4.0]), np.array([0.0, 1.0]), np.array([-1.0, -2.0]), np.array([-3.0, 9.0])]
    masks = select_tokens(excess, k=0.5, scope="per_batch", group_size=2)
    assert [m.tolist() for m in masks] == [[True, True], [False, False], [True, False], [False, True]]


def test_global_ranks_everything_together():
    excess = [np.array([5.0, 4.0]), np.array([0.0, 1.0]), np.array([-1.0, -2.0]), np.array([-3.0, 9.0])]
    masks = select_tokens(excess, k=0.5, scope="global")
    assert [m.tolist() for m in masks] == [[True, True], [False, True], [False, False], [False, True]]


def test_unknown_scope_is_rejected():
    with pytest.raises(ValueError, match="token scope"):
        select_tokens([np.array([1.0])], 0.5, scope="per_token")


token_lists = st.lists(
    st.lists(st.floats(-20, 20, allow_nan=False), min_size=0, max_size=12).map(np.array), min_size=1, max_size=10
)


@settings(max_examples=200, deadline=None)
@given(excess=token_lists, k=st.floats(0.01, 1.0), scope=st.sampled_from(["per_sample", "per_batch", "global"]),
       group_size=st.integers(1, 5))
def test_exact_count_and_kept_dominate_dropped_within_scope(excess, k, scope, group_size):
    masks = select_tokens(excess, k, scope, group_size)
    assert [len(m) for m in masks] == [len(x) for x in excess]
    if scope == "per_sample":
        scopes = [[i] for i in range(len(excess))]
    elif scope == "per_batch":
        scopes = [list(range(s, min(s + group_size, len(excess)))) for s in range(0, len(excess), group_size)]
    else:
        scopes = [list(range(len(excess)))]
    for members in scopes:
        values = np.concatenate([excess[i] for i in members] + [np.zeros(0)])
        kept = np.concatenate([masks[i] for i in members] + [np.zeros(0, bool)]).astype(bool)
        assert kept.sum() == keep_count(len(values), k)
        if kept.any() and (~kept).any():
            assert values[kept].min() >= values[~kept].max()


@settings(max_examples=100, deadline=None)
@given(scores=st.lists(st.one_of(st.floats(-50, 50, allow_nan=False), st.sampled_from([0.0, 1.0])), min_size=1,
                       max_size=30), data=st.data())  # sampled_from: many ties
def test_top_m_properties(scores, data):
    m = data.draw(st.integers(1, len(scores)))
    chosen = top_m_samples(np.array(scores), m)
    assert len(chosen) == len(set(chosen.tolist())) == m
    rest = np.setdiff1d(np.arange(len(scores)), chosen)
    if len(rest):
        assert min(scores[i] for i in chosen) >= max(scores[i] for i in rest)
    # best first, and equal scores by sample order, so every worker and every rerun keeps the same samples
    ranked = [(-scores[i], int(i)) for i in chosen]
    assert ranked == sorted(ranked)
    tied_out = [i for i in rest if scores[i] == scores[chosen[-1]]]
    assert all(i > chosen[-1] for i in tied_out)
