"""Carry each kept sample's token mask onto the target tokenizer (identity when tokenizers agree)."""

from __future__ import annotations

import numpy as np

from titok import columns as C
from titok.align import align_values
from titok.models import load_tokenizer
from titok.sequences import encode_response
from titok.stages.arrow import table

__all__ = ["AlignToTarget"]


class AlignToTarget:
    """Holds the target tokenizer; no model, so it is cheap and runs on CPU actors."""

    required_columns = (C.SAMPLE_ID, C.QUERY, C.RESPONSE, C.OFFSET_STARTS, C.OFFSET_ENDS, C.KEEP)

    def __init__(self, target_base: str, trust_remote_code: bool = False):
        self.tokenizer = load_tokenizer(target_base, trust_remote_code)

    def __call__(self, batch: dict):
        missing = [c for c in self.required_columns if c not in batch]
        if missing:
            raise KeyError(f"align stage needs columns {missing}; got {sorted(batch)}")
        target_ids, target_weights = [], []
        for response, starts, ends, keep in zip(batch[C.RESPONSE], batch[C.OFFSET_STARTS], batch[C.OFFSET_ENDS], batch[C.KEEP]):
            ids, offsets = encode_response(self.tokenizer, response)
            if len(ids) and len(starts):
                weights = align_values(np.stack([starts, ends], axis=1), np.asarray(keep, dtype=np.float64), offsets, len(response))
            else:  # nothing on one side to align: the sample teaches nothing
                weights = np.zeros(len(ids))
            target_ids.append(np.asarray(ids, dtype=np.int64))
            target_weights.append(weights.astype(np.float32))
        return table({**batch, C.TARGET_TOKEN_IDS: target_ids, C.TARGET_WEIGHTS: target_weights})
