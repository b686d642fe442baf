"""The two TiTok filters: keep the top-M samples by mean excess, then the top-k% tokens by excess.

Ties are broken by position (earlier sample, then earlier token, wins), so a selection is a pure
function of its inputs. Each scope keeps ``ceil(k * n)`` tokens, so a non-empty scope keeps at least
one token and k = 1 keeps all.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from titok.choices import TOKEN_SCOPES, TokenScope

__all__ = ["TokenScope", "keep_count", "sample_scores", "select_tokens", "top_m_samples", "validate_k", "validate_m"]


def validate_k(k: float) -> float:
    if not (isinstance(k, (int, float)) and 0.0 < k <= 1.0):
        raise ValueError(f"token fraction k must be in (0, 1], got {k!r}")
    return float(k)


def validate_m(m: int, pool_size: int | None = None) -> int:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"number of kept samples M must be an integer >= 1, got {m!r}")
    if pool_size is not None and m > pool_size:
        raise ValueError(f"M={m} is larger than the pool of {pool_size} samples")
    return int(m)


def keep_count(n_tokens: int, k: float) -> int:
    """ceil(k * n), guarded against float noise (0.7 * 10 must give 7, not 8)."""
    return min(n_tokens, math.ceil(k * n_tokens - 1e-9))


def sample_scores(excess: Sequence[np.ndarray]) -> np.ndarray:
    """Mean excess over each sample's response tokens; an empty response scores -inf."""
    return np.array([float(np.mean(x)) if len(x) else -np.inf for x in excess], dtype=np.float64)


def top_m_samples(scores: np.ndarray, m: int) -> np.ndarray:
    """Indices of the M highest scores, best first; equal scores keep their input order."""
    scores = np.asarray(scores, dtype=np.float64)
    m = validate_m(m, len(scores))
    if np.isnan(scores).any():
        raise ValueError("sample scores contain NaN")
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:m]


def _top_k_mask(values: np.ndarray, k: float) -> np.ndarray:
    keep = np.zeros(len(values), dtype=bool)
    n_keep = keep_count(len(values), k)
    if n_keep:
        keep[np.lexsort((np.arange(len(values)), -values))[:n_keep]] = True
    return keep


def select_tokens(
    excess: Sequence[np.ndarray], k: float, scope: TokenScope = "per_sample", group_size: int = 4
) -> list[np.ndarray]:
    """Boolean keep-mask per sample: the top ``k`` fraction of tokens by excess within each scope.

    ``per_sample`` ranks each response on its own (the paper's slides); ``per_batch`` ranks the
    tokens of consecutive groups of ``group_size`` samples together (what the official release
    does with its batches of 4); ``global`` ranks all tokens of all samples together.
    """
    k = validate_k(k)
    if scope not in TOKEN_SCOPES:
        raise ValueError(f"token scope must be one of {TOKEN_SCOPES}, got {scope!r}")
    excess = [np.asarray(x, dtype=np.float64) for x in excess]
    if any(np.isnan(x).any() for x in excess):
        raise ValueError("token excess contains NaN")
    if scope == "per_sample":
        return [_top_k_mask(x, k) for x in excess]
    if scope == "global":
        group_size = max(len(excess), 1)
    elif group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    masks: list[np.ndarray] = []
    for start in range(0, len(excess), group_size):
        group = excess[start : start + group_size]
        flat_mask = _top_k_mask(np.concatenate(group) if group else np.zeros(0), k)
        masks.extend(np.split(flat_mask, np.cumsum([len(x) for x in group])[:-1]))
    return masks
