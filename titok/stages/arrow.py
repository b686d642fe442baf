"""Arrow tables with explicit list types, so per-token arrays land in Parquet as plain list columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from titok import columns as C

__all__ = ["numpy_columns", "table"]

_LIST_TYPES = {
    C.TOKEN_IDS: pa.list_(pa.int64()),
    C.OFFSET_STARTS: pa.list_(pa.int64()),
    C.OFFSET_ENDS: pa.list_(pa.int64()),
    C.EXPERT_LOGPROBS: pa.list_(pa.float32()),
    C.AMATEUR_LOGPROBS: pa.list_(pa.float32()),
    C.EXCESS: pa.list_(pa.float32()),
    C.KEEP: pa.list_(pa.bool_()),
    C.TARGET_TOKEN_IDS: pa.list_(pa.int64()),
    C.TARGET_WEIGHTS: pa.list_(pa.float32()),
    C.TARGET_LOGPROBS: pa.list_(pa.float32()),
}
# per token, n values: (tokens, n) arrays
_NESTED_TYPES = {
    C.EXPERT_TOP_LOGPROBS: pa.list_(pa.list_(pa.float32())),
    C.TARGET_TEACHER: pa.list_(pa.list_(pa.float32())),
}


def table(columns: dict) -> pa.Table:
    arrays = {}
    for name, values in columns.items():
        if name in _LIST_TYPES:  # None stays null: "not known" (e.g. expert log-probs to be rescored)
            arrays[name] = pa.array([None if v is None else np.asarray(v).tolist() for v in values], type=_LIST_TYPES[name])
        elif name in _NESTED_TYPES:
            arrays[name] = pa.array([None if v is None else [np.asarray(r, dtype=np.float32).tolist() for r in v]
                                     for v in values], type=_NESTED_TYPES[name])
        else:
            arrays[name] = pa.array(list(values) if isinstance(values, np.ndarray) and values.dtype == object else values)
    return pa.table(arrays)


def numpy_columns(rows: pa.Table) -> dict:
    """``table``'s inverse: the batch form the stage operations take (list columns as object arrays)."""
    return {name: rows.column(name).to_numpy(zero_copy_only=False) for name in rows.column_names}
