"""Carry each kept sample's token mask onto the target tokenizer (identity when tokenizers agree),
and for a distilling method the expert's top-n log-probs, paired by character span (``titok.core.distill``)."""

from __future__ import annotations

import numpy as np

from titok import columns as C
from titok.core.span_transfer import align_values
from titok.core.distill import teacher_for_target
from titok.core.reference import target_token_scores
from titok.core.select import select_tokens
from titok.models import load_tokenizer
from titok.core.sequences import encode_response
from titok.stages.arrow import table

__all__ = ["AlignToTarget"]


class AlignToTarget:
    """Holds the target tokenizer (and, for a target-aware token filter, the target base itself);
    with the paper's reference it needs no model, so it is cheap and runs on CPU actors."""

    required_columns = (C.SAMPLE_ID, C.QUERY, C.RESPONSE, C.OFFSET_STARTS, C.OFFSET_ENDS, C.KEEP)

    def __init__(self, target_base: str, trust_remote_code: bool = False, reference: str = "source_amateur",
                 k: float = 0.7, dtype: str = "auto", batch_size: int = 8, gpus: int = 0, run_dir: str | None = None,
                 distill: bool = False):
        self.tokenizer = load_tokenizer(target_base, trust_remote_code)
        self.reference, self.k, self.batch_size, self.distill = reference, k, batch_size, distill
        self.model = None
        if reference != "source_amateur":  # the target base scores the kept samples
            import torch

            from titok.hardware import resolve_dtype
            from titok.models import load_model
            from titok.runstate import RunDir

            dtype_choice = resolve_dtype(dtype)
            # split over the actor's GPUs (a 70B target does not fit one); "auto" only then, since on one
            # GPU it would silently offload what does not fit to the CPU
            device_map = None if not torch.cuda.is_available() else "auto" if gpus > 1 else "cuda"
            self.model = load_model(target_base, getattr(torch, dtype_choice[0]), trust_remote_code, device_map=device_map)
            if run_dir is not None:  # the event log records every model load
                RunDir(run_dir).log_event(event="model_load", stage="align", model=target_base, dtype=list(dtype_choice))

    def __call__(self, batch: dict):
        missing = [c for c in self.required_columns if c not in batch]
        if missing:
            raise KeyError(f"align stage needs columns {missing}; got {sorted(batch)}")
        if self.distill and C.EXPERT_TOP_LOGPROBS not in batch:
            raise KeyError(f"a distilling method needs the labels' {C.EXPERT_TOP_LOGPROBS} (labels.top_logprobs > 0); "
                           f"got {sorted(batch)}")
        target_ids, target_weights, target_lps, teachers = [], [], [], []
        scored = None
        if self.model is not None:
            from titok.core.excess import text_logprobs

            scored = text_logprobs(self.model, self.tokenizer, list(batch[C.QUERY]), list(batch[C.RESPONSE]), self.batch_size)
        for row, (response, starts, ends, keep) in enumerate(zip(batch[C.RESPONSE], batch[C.OFFSET_STARTS],
                                                                 batch[C.OFFSET_ENDS], batch[C.KEEP])):
            ids, offsets = encode_response(self.tokenizer, response)
            source_offsets = np.stack([starts, ends], axis=1)
            if not (len(ids) and len(starts)):  # nothing on one side to align: the sample teaches nothing
                weights = np.zeros(len(ids))
            elif scored is None:
                weights = align_values(source_offsets, np.asarray(keep, dtype=np.float64), offsets, len(response))
            else:
                scores = target_token_scores(source_offsets, batch[C.EXPERT_LOGPROBS][row], batch[C.AMATEUR_LOGPROBS][row],
                                             offsets, scored[row], len(response), self.reference)
                weights = select_tokens([scores], self.k, "per_sample")[0].astype(np.float64)
            target_ids.append(np.asarray(ids, dtype=np.int64))
            target_weights.append(weights.astype(np.float32))
            target_lps.append(None if scored is None else scored[row])
            if self.distill:
                top = batch[C.EXPERT_TOP_LOGPROBS][row]
                teachers.append(None if top is None or not (len(ids) and len(starts)) else
                                teacher_for_target(source_offsets, top, offsets, len(response)))
        columns = {**batch, C.TARGET_TOKEN_IDS: target_ids, C.TARGET_WEIGHTS: target_weights}
        if scored is not None:
            columns[C.TARGET_LOGPROBS] = target_lps
        if self.distill:
            columns[C.TARGET_TEACHER] = teachers
        return table(columns)
