"""The distributed filters agree exactly with the single-machine core."""

import numpy as np
import pytest

from titok import columns as C
from titok.core.select import sample_scores, select_tokens, top_m_samples
from titok.stages.filtering import select_tokens_distributed, select_top_m


def _rows(seed: int, n: int = 40, ties: bool = False):
    rng = np.random.default_rng(seed)
    rows = []
    for sid in rng.permutation(n):
        length = int(rng.integers(0, 15))
        excess = rng.normal(size=length).astype(np.float32)
        if ties:
            excess = np.round(excess).astype(np.float32)
        rows.append({C.SAMPLE_ID: int(sid), C.EXCESS: excess, C.N_TOKENS: length,
                     C.SAMPLE_SCORE: float(sample_scores([excess])[0])})
    return rows


@pytest.mark.parametrize("ties", [False, True])
def test_top_m_matches_core(local_ray, ties):
    rows = _rows(0, ties=ties)
    ds = local_ray.data.from_items(rows, override_num_blocks=4)
    got = [r[C.SAMPLE_ID] for r in select_top_m(ds, 12).take_all()]
    by_id = sorted(rows, key=lambda r: r[C.SAMPLE_ID])  # the core breaks ties by position: give it id order
    expected = top_m_samples(np.array([r[C.SAMPLE_SCORE] for r in by_id]), 12)
    assert got == [by_id[i][C.SAMPLE_ID] for i in expected]
    with pytest.raises(ValueError, match="larger than the pool"):
        select_top_m(ds, 41)


@pytest.mark.parametrize("scope", ["per_sample", "per_batch", "global"])
@pytest.mark.parametrize("ties", [False, True])
def test_token_selection_matches_core(local_ray, scope, ties):
    rows = _rows(1, ties=ties)
    ds = local_ray.data.from_items(rows, override_num_blocks=4)
    kept = select_top_m(ds, 20)
    got = {r[C.SAMPLE_ID]: np.asarray(r[C.KEEP], dtype=bool) for r in select_tokens_distributed(kept, 0.7, scope, 4).take_all()}
    assert len(got) == 20
    ranked = sorted(rows, key=lambda r: (-r[C.SAMPLE_SCORE], r[C.SAMPLE_ID]))[:20]
    if scope == "global":  # the distributed tie-break is by sample id, so hand the core id order
        ranked = sorted(ranked, key=lambda r: r[C.SAMPLE_ID])
    expected = select_tokens([r[C.EXCESS] for r in ranked], 0.7, scope, 4)
    for row, mask in zip(ranked, expected):
        np.testing.assert_array_equal(got[row[C.SAMPLE_ID]], mask)


def test_baseline_and_ablation_methods(local_ray):
    from titok.core.select import keep_count
    from titok.stages.filtering import apply_filter_method

    rows = _rows(2)
    ds = local_ray.data.from_items(rows, override_num_blocks=4)
    by_id = {r[C.SAMPLE_ID]: r for r in rows}
    top = {r[C.SAMPLE_ID] for r in sorted(rows, key=lambda r: (-r[C.SAMPLE_SCORE], r[C.SAMPLE_ID]))[:10]}

    def run(method, seed=0):
        out = apply_filter_method(ds, method, m=10, k=0.5, scope="per_sample", group_size=4, seed=seed).take_all()
        return {r[C.SAMPLE_ID]: np.asarray(r[C.KEEP], dtype=bool) for r in out}

    kd = run("kd")
    assert set(kd) == set(by_id) and all(mask.all() for mask in kd.values())
    top_m_only = run("top_m_only")
    assert set(top_m_only) == top and all(mask.all() for mask in top_m_only.values())
    random_m = run("random_m", seed=3)
    assert len(random_m) == 10 and all(mask.all() for mask in random_m.values())
    assert set(run("random_m", seed=3)) == set(random_m)  # seeded
    top_k_only = run("top_k_only")
    assert set(top_k_only) == set(by_id)
    assert all(mask.sum() == keep_count(len(mask), 0.5) for mask in top_k_only.values())
    titok = run("titok")
    assert set(titok) == top and all(mask.sum() == keep_count(len(mask), 0.5) for mask in titok.values())


@pytest.mark.parametrize("scope", ["per_sample", "per_batch", "global"])
def test_one_pool_form_equals_the_distributed_filter(local_ray, scope):
    """A zoo filters each adapter's pool on one worker (``filter_pool``): same rows, same masks (row order
    carries no meaning: training orders rows by sample id)."""
    from titok.choices import FILTER_METHODS
    from titok.stages.filtering import apply_filter_method, filter_pool

    rows = _rows(3, ties=True)  # ties: the tie-breaks must agree too
    ds = local_ray.data.from_items(rows, override_num_blocks=4)
    pool = {name: np.empty(len(rows), dtype=object) for name in rows[0]}  # numpy columns, as map_groups hands them
    for i, row in enumerate(rows):
        for name, value in row.items():
            pool[name][i] = value
    one_pool_methods = [m for m, spec in FILTER_METHODS.items() if spec.one_pool]
    assert {"titok", "kd", "top_m_only", "top_k_only"} <= set(one_pool_methods)
    for method in one_pool_methods:
        distributed = apply_filter_method(ds, method, m=12, k=0.6, scope=scope, group_size=3, seed=0).take_all()
        local = filter_pool(pool, method, m=12, k=0.6, scope=scope, group_size=3)
        got = dict(zip(local[C.SAMPLE_ID], local[C.KEEP]))
        assert set(got) == {r[C.SAMPLE_ID] for r in distributed}, method
        for r in distributed:
            np.testing.assert_array_equal(got[r[C.SAMPLE_ID]], np.asarray(r[C.KEEP], dtype=bool), err_msg=method)
    with pytest.raises(ValueError, match="no one-pool form"):
        filter_pool(pool, "random_m", m=12, k=0.6, scope=scope, group_size=3)
