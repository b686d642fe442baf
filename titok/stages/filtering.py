"""The TiTok filters over a whole Ray Dataset, without collecting token data on the driver.

- Top-M samples: a distributed sort on (sample_score desc, sample_id asc), then ``limit(M)``.
- Top-k% tokens, ``per_sample``: each row on its own (``map_batches``).
- ``per_batch``: groups of ``group_size`` samples in rank order; only the M (sample_id, score) pairs
  come to the driver to number the ranks, then ``groupby(group).map_groups`` selects inside groups.
- ``global``: exact, by bracketing. ``ApproximateQuantile`` (a KLL sketch) estimates the excess value
  at the cut; two exact distributed passes then count the tokens above the bracket and fetch only
  the tokens inside it (a few percent of all tokens), where the exact cut-off token is found with the
  same tie-breaking as ``titok.core.select`` (earlier sample id, then earlier token, wins). The bracket
  widens until it provably contains the cut. Exact rather than approximate so that the kept count is
  exactly ``ceil(k * N)``, the same as the single-machine core.

``filter_pool`` is the same selection on one pool held by one worker (a zoo filters every adapter's
pool in one ``groupby(adapter).map_groups`` pass): equal rows and masks, with no Ray call inside.
"""

from __future__ import annotations

import numpy as np

from titok import columns as C
from titok.choices import FILTER_METHODS
from titok.core.select import keep_count, select_tokens, validate_k, validate_m
from titok.stages.arrow import table

__all__ = ["apply_filter_method", "filter_pool", "global_token_cutoff", "keep_all_tokens", "select_random_m",
           "select_tokens_distributed", "select_top_m"]


def select_top_m(ds, m: int):
    """The M samples with the highest mean excess, ties to the smaller sample id."""
    validate_m(m, ds.count())
    return ds.sort([C.SAMPLE_SCORE, C.SAMPLE_ID], descending=[True, False]).limit(m)


def select_random_m(ds, m: int, seed: int):
    """M samples drawn uniformly at random (the random-M baseline); seeded, so reruns agree."""
    validate_m(m, ds.count())
    return ds.random_shuffle(seed=seed).limit(m)


def _keep_all(batch: dict):
    return table({**batch, C.KEEP: [np.ones(len(x), dtype=bool) for x in batch[C.EXCESS]]})


def keep_all_tokens(ds):
    return ds.map_batches(_keep_all, batch_format="numpy")


def apply_filter_method(ds, method: str, m: int, k: float, scope: str, group_size: int, seed: int):
    """TiTok's two filters, or one of the baselines/ablations that share the same scored data
    (``titok.choices.FILTER_METHODS`` says which samples and whether tokens are picked)."""
    if method not in FILTER_METHODS:
        raise ValueError(f"unknown filter method {method!r}: expected one of {list(FILTER_METHODS)}")
    spec = FILTER_METHODS[method]
    samples = {"top_m": lambda: select_top_m(ds, m), "random": lambda: select_random_m(ds, m, seed),
               "all": lambda: ds}[spec.samples]()
    return select_tokens_distributed(samples, k, scope, group_size) if spec.token_filter else keep_all_tokens(samples)


def filter_pool(pool: dict, method: str, m: int, k: float, scope: str, group_size: int) -> dict:
    """``apply_filter_method`` on one pool of numpy columns: the same kept rows (best first) and masks.

    Raises ValueError for a method without a one-pool form (``FilterMethod.one_pool``).
    """
    spec = FILTER_METHODS[method]
    if not spec.one_pool:
        raise ValueError(f"filter method {method!r} has no one-pool form")
    ids = np.asarray(pool[C.SAMPLE_ID])
    rank = np.lexsort((ids, -np.asarray(pool[C.SAMPLE_SCORE], dtype=np.float64)))  # the distributed sort's order
    rows = rank[: validate_m(m, len(ids))] if spec.keeps_m else np.arange(len(ids))
    excess = [pool[C.EXCESS][i] for i in rows]
    if not spec.token_filter:
        masks = [np.ones(len(x), dtype=bool) for x in excess]
    elif scope == "per_sample":
        masks = select_tokens(excess, k, "per_sample")
    else:  # ties go to the earlier sample: by rank inside per_batch groups, by sample id globally
        rows_in_rank = np.argsort(rank)[rows]  # each kept row's position in the ranking
        order = np.argsort(rows_in_rank if scope == "per_batch" else ids[rows], kind="stable")
        ranked = select_tokens([excess[i] for i in order], k, scope, group_size)
        masks = [None] * len(rows)
        for position, i in enumerate(order):
            masks[i] = ranked[position]
    return {**{name: values[rows] for name, values in pool.items()}, C.KEEP: masks}


def _keep_in_batch(batch: dict, k: float, scope: str):
    masks = select_tokens(list(batch[C.EXCESS]), k, scope, group_size=len(batch[C.EXCESS]))
    return table({**batch, C.KEEP: masks})


def _explode_tokens(batch: dict) -> dict:
    lengths = [len(x) for x in batch[C.EXCESS]]
    return {
        C.EXCESS: np.concatenate([np.asarray(x, dtype=np.float64) for x in batch[C.EXCESS]] + [np.zeros(0)]),
        C.SAMPLE_ID: np.repeat(np.asarray(batch[C.SAMPLE_ID], dtype=np.int64), lengths),
        "token_index": np.concatenate([np.arange(n) for n in lengths] + [np.zeros(0, dtype=np.int64)]),
    }


def _rows_where(batch: dict, low: float, high: float) -> dict:
    inside = (batch[C.EXCESS] >= low) & (batch[C.EXCESS] <= high)
    return {name: values[inside] for name, values in batch.items()}


def global_token_cutoff(ds, k: float, start_margin: float = 0.01) -> tuple[float, int, int] | None:
    """The last kept token's (excess, sample_id, token_index) for global top-k%; None keeps all.

    A token is kept iff (-excess, sample_id, token_index) <= (-cut_excess, cut_sample, cut_index).
    """
    from ray.data.aggregate import ApproximateQuantile
    from ray.data.expressions import col

    n_total = int(ds.sum(C.N_TOKENS) or 0)
    n_keep = keep_count(n_total, k)
    if n_keep == n_total:
        return None
    tokens = ds.select_columns([C.SAMPLE_ID, C.EXCESS]).map_batches(_explode_tokens, batch_format="numpy").materialize()
    cut_quantile = 1.0 - n_keep / n_total
    margin = start_margin
    while True:
        lo_q, hi_q = max(cut_quantile - margin, 0.0), min(cut_quantile + margin, 1.0)
        if margin >= 1.0:
            low, high = -np.inf, np.inf
        else:
            low, high = tokens.aggregate(ApproximateQuantile(C.EXCESS, [lo_q, hi_q]))[f"approx_quantile({C.EXCESS})"]
        n_above = tokens.filter(expr=col(C.EXCESS) > float(high)).count() if np.isfinite(high) else 0
        band = tokens.map_batches(_rows_where, fn_kwargs={"low": low, "high": high}, batch_format="numpy")
        band = band.to_pandas()
        if n_above < n_keep <= n_above + len(band):
            break
        margin *= 4
    order = np.lexsort((band["token_index"], band[C.SAMPLE_ID], -band[C.EXCESS]))
    cut = band.iloc[order[n_keep - n_above - 1]]
    return float(cut[C.EXCESS]), int(cut[C.SAMPLE_ID]), int(cut["token_index"])


def _keep_by_cutoff(batch: dict, cutoff: tuple[float, int, int] | None):
    masks = []
    for sample_id, excess in zip(batch[C.SAMPLE_ID], batch[C.EXCESS]):
        excess = np.asarray(excess, dtype=np.float64)
        if cutoff is None:
            masks.append(np.ones(len(excess), dtype=bool))
            continue
        cut_excess, cut_sample, cut_index = cutoff
        before_in_tiebreak = (sample_id < cut_sample) | ((sample_id == cut_sample) & (np.arange(len(excess)) <= cut_index))
        masks.append((excess > cut_excess) | ((excess == cut_excess) & before_in_tiebreak))
    return table({**batch, C.KEEP: masks})


def select_tokens_distributed(ds, k: float, scope: str, group_size: int = 4):
    """Add the ``keep`` column to the kept samples (see the module doc for each scope)."""
    k = validate_k(k)
    if scope != "per_sample":
        ds = ds.materialize()  # read several times below: compute the top-M sort once, keep it in the object store
    if scope == "per_sample":
        return ds.map_batches(_keep_in_batch, fn_kwargs={"k": k, "scope": "per_sample"}, batch_format="numpy")
    if scope == "per_batch":
        ranked = ds.select_columns([C.SAMPLE_ID, C.SAMPLE_SCORE]).to_pandas()
        ranked = ranked.sort_values([C.SAMPLE_SCORE, C.SAMPLE_ID], ascending=[False, True], kind="stable")
        group_of = {int(sid): rank // group_size for rank, sid in enumerate(ranked[C.SAMPLE_ID])}
        rank_of = {int(sid): rank for rank, sid in enumerate(ranked[C.SAMPLE_ID])}

        def add_group(batch: dict):
            ids = batch[C.SAMPLE_ID]
            return table({**batch, "group": np.array([group_of[int(i)] for i in ids]),
                          "rank": np.array([rank_of[int(i)] for i in ids])})

        def keep_in_group(batch: dict):
            order = np.argsort(batch["rank"], kind="stable")
            batch = {name: values[order] for name, values in batch.items() if name not in ("group", "rank")}
            return _keep_in_batch(batch, k, "per_batch")

        n_groups = max(group_of.values(), default=0) + 1
        grouped = ds.map_batches(add_group, batch_format="numpy").groupby("group", num_partitions=min(n_groups, 64))
        return grouped.map_groups(keep_in_group, batch_format="numpy")
    if scope == "global":
        cutoff = global_token_cutoff(ds, k)
        return ds.map_batches(_keep_by_cutoff, fn_kwargs={"cutoff": cutoff}, batch_format="numpy")
    raise ValueError(f"token scope must be per_sample, per_batch or global, got {scope!r}")
