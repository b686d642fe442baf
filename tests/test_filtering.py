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


def _masks(ds) -> dict:
    return {r[C.SAMPLE_ID]: np.asarray(r[C.KEEP], dtype=bool) for r in ds.take_all()}


def _numpy_pool(rows: list[dict]) -> dict:
    """The rows as numpy object columns, as ``map_groups`` hands a zoo's pool to ``filter_pool``."""
    pool = {name: np.empty(len(rows), dtype=object) for name in rows[0]}
    for i, row in enumerate(rows):
        for name, value in row.items():
            pool[name][i] = value
    return pool


# ties (whole-number excess) test the tie-breaks; continuous values the global bracket's widening
@pytest.mark.parametrize("scope,ties", [("per_sample", True), ("per_batch", True), ("global", True), ("global", False)])
def test_token_selection_matches_core_and_the_one_pool_form(local_ray, scope, ties):
    """The distributed top-k% tokens equal the single-machine core's, and ``filter_pool`` (a zoo
    filters each adapter's pool on one worker) keeps the same rows and masks for every method that
    has a one-pool form (row order carries no meaning: training orders rows by sample id)."""
    from titok.choices import FILTER_METHODS
    from titok.stages.filtering import apply_filter_method, filter_pool

    rows = _rows(1, ties=ties)
    ds = local_ray.data.from_items(rows, override_num_blocks=4)
    got = _masks(select_tokens_distributed(select_top_m(ds, 20), 0.7, scope, 4))
    assert len(got) == 20
    ranked = sorted(rows, key=lambda r: (-r[C.SAMPLE_SCORE], r[C.SAMPLE_ID]))[:20]
    if scope == "global":  # the distributed tie-break is by sample id, so hand the core id order
        ranked = sorted(ranked, key=lambda r: r[C.SAMPLE_ID])
    expected = select_tokens([r[C.EXCESS] for r in ranked], 0.7, scope, 4)
    for row, mask in zip(ranked, expected):
        np.testing.assert_array_equal(got[row[C.SAMPLE_ID]], mask)

    one_pool = [m for m, spec in FILTER_METHODS.items() if spec.one_pool]
    assert {"titok", "kd", "top_m_only", "top_k_only"} <= set(one_pool)
    pool = _numpy_pool(rows)
    # a method that picks no tokens does the same in every scope: its distributed form runs once
    checked = [m for m in one_pool if FILTER_METHODS[m].token_filter or scope == "per_sample"]
    for method in checked:
        distributed = got if method == "titok" else _masks(apply_filter_method(ds, method, m=20, k=0.7, scope=scope,
                                                                               group_size=4, seed=0))
        local = filter_pool(pool, method, m=20, k=0.7, scope=scope, group_size=4)
        assert set(local[C.SAMPLE_ID]) == set(distributed), method
        for sample_id, mask in zip(local[C.SAMPLE_ID], local[C.KEEP]):
            np.testing.assert_array_equal(mask, distributed[sample_id], err_msg=method)
    with pytest.raises(ValueError, match="no one-pool form"):
        filter_pool(pool, "random_m", m=12, k=0.6, scope=scope, group_size=3)


def test_baseline_and_ablation_methods(local_ray):
    from titok.core.select import keep_count
    from titok.stages.filtering import apply_filter_method

    rows = _rows(2)
    ds = local_ray.data.from_items(rows, override_num_blocks=4)
    by_id = {r[C.SAMPLE_ID]: r for r in rows}
    top = {r[C.SAMPLE_ID] for r in sorted(rows, key=lambda r: (-r[C.SAMPLE_SCORE], r[C.SAMPLE_ID]))[:10]}

    def run(method, seed=0):
        return _masks(apply_filter_method(ds, method, m=10, k=0.5, scope="per_sample", group_size=4, seed=seed))

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
