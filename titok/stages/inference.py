"""What an engine does with one batch of rows: write queries, label them, score them (or label and
score them in one go).

Plain functions of (engine, batch, params), run inside the engine actors of ``stages.fleet``; each
checks the columns it needs and returns the batch with its own columns added.
"""

from __future__ import annotations

import numpy as np

from titok import columns as C
from titok.engines import GenerationParams, InferenceEngine
from titok.core.synthetic_queries import parse_query
from titok.core.select import sample_scores
from titok.stages.arrow import numpy_columns, table

__all__ = ["OPERATIONS", "label_and_score", "label_responses", "score_excess", "write_queries"]


def _check(stage: str, batch: dict, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in batch]
    if missing:
        raise KeyError(f"{stage} stage needs columns {missing}; got {sorted(batch)}")


def _select_adapter(engine: InferenceEngine, params: dict) -> None:
    """The expert for this batch: a pass serves one adapter, so a batch never mixes adapters."""
    engine.select_adapter(params["adapter"])


def write_queries(engine: InferenceEngine, batch: dict, params: dict) -> dict:
    """Raw few-shot prompt -> one new query, continued by the source base (adapter off)."""
    _check("queries", batch, (C.SAMPLE_ID, C.MESSAGE))
    p = GenerationParams(**params)
    # a seed per batch, from its first row: the same prompts give the same queries on any actor
    seeded = GenerationParams(p.max_new_tokens, p.temperature, p.top_p, p.seed * 1_000_003 + int(batch[C.SAMPLE_ID][0]))
    texts = engine.generate(list(batch[C.MESSAGE]), seeded, use_adapter=False, chat=False)
    return {C.SAMPLE_ID: batch[C.SAMPLE_ID], C.QUERY: np.array([parse_query(t) for t in texts], dtype=object)}


def label_responses(engine: InferenceEngine, batch: dict, params: dict) -> dict:
    """The expert (source base + adapter) answers each query."""
    _check("labels", batch, (C.SAMPLE_ID, C.QUERY))
    _select_adapter(engine, params)
    top_n = params.get("top_logprobs", 0)
    labels = engine.label(list(batch[C.QUERY]), GenerationParams(**params["generation"]), top_n)
    # the expert's log-prob of each answer token, kept from generation: scoring then runs the amateur
    # only (null where the generated tokens are not the answer's own tokenization: rescored); and its
    # top-n log-probs there, what logit distillation reads (null for a rescored answer: scoring's
    # expert pass gives them)
    columns = {**batch, C.RESPONSE: [label.text for label in labels],
               C.EXPERT_LOGPROBS: [label.expert_logprobs for label in labels]}
    if top_n:
        columns[C.EXPERT_TOP_LOGPROBS] = [None if label.top_logprobs is None else list(label.top_logprobs) for label in labels]
    return table(columns)


def score_excess(engine: InferenceEngine, batch: dict, params: dict):
    """Expert and amateur log-probs of every response token, from one base copy."""
    _check("scores", batch, (C.SAMPLE_ID, C.QUERY, C.RESPONSE))
    _select_adapter(engine, params)
    known = list(batch[C.EXPERT_LOGPROBS]) if C.EXPERT_LOGPROBS in batch else None
    top_n = params.get("top_logprobs", 0)
    scored = engine.score(list(batch[C.QUERY]), list(batch[C.RESPONSE]), known, top_n)
    excess = [s.excess for s in scored]
    top = {}
    if top_n:  # the labels' where generation gave them, this pass's where the expert was rescored
        from_labels = batch[C.EXPERT_TOP_LOGPROBS] if C.EXPERT_TOP_LOGPROBS in batch else [None] * len(scored)
        top = {C.EXPERT_TOP_LOGPROBS: [s.expert_top if s.expert_top is not None else kept
                                        for s, kept in zip(scored, from_labels)]}
    return table({
        **{name: batch[name] for name in (C.SAMPLE_ID, C.QUERY, C.RESPONSE)}, **top,
        C.TOKEN_IDS: [s.token_ids for s in scored],
        C.OFFSET_STARTS: [s.offsets[:, 0] for s in scored],
        C.OFFSET_ENDS: [s.offsets[:, 1] for s in scored],
        C.EXPERT_LOGPROBS: [s.expert_logprobs for s in scored],
        C.AMATEUR_LOGPROBS: [s.amateur_logprobs for s in scored],
        C.EXCESS: excess,
        C.N_TOKENS: np.array([len(x) for x in excess], dtype=np.int64),
        C.SAMPLE_SCORE: sample_scores(excess),
    })


def label_and_score(engine: InferenceEngine, batch: dict, params: dict):
    """Labels, then scores of the same rows while they are in hand (labels stream into scores):
    ``(labels, scores)``, each what its own operation gives for the batch."""
    labels = label_responses(engine, batch, params)
    return labels, score_excess(engine, numpy_columns(labels), params)


OPERATIONS = {"queries": write_queries, "labels": label_responses, "scores": score_excess, "labels+scores": label_and_score}
