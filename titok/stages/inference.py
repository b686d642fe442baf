"""Actor-pool UDFs that hold a model: query writing, expert labels, expert/amateur scoring."""

from __future__ import annotations

import numpy as np

from titok import columns as C
from titok.engines import GenerationParams, build_engine
from titok.queries import parse_query
from titok.runstate import RunDir
from titok.select import sample_scores
from titok.stages.arrow import table

__all__ = ["LabelResponses", "ScoreExcess", "WriteQueries"]


class _EngineUDF:
    """Loads one engine per actor and records the load in the run's event log."""

    stage = ""
    required_columns: tuple[str, ...] = ()

    def __init__(self, run_dir: str, engine: dict, params: dict | None = None):
        import ray

        self.engine = build_engine(**engine)
        self.params = GenerationParams(**params) if params else None
        self.run = RunDir(run_dir)
        self.run.log_event(event="model_load", stage=self.stage, node_id=ray.get_runtime_context().get_node_id())

    def _check(self, batch: dict) -> None:
        missing = [c for c in self.required_columns if c not in batch]
        if missing:
            raise KeyError(f"{self.stage} stage needs columns {missing}; got {sorted(batch)}")


class WriteQueries(_EngineUDF):
    """Raw few-shot prompt -> one new query, continued by the source base (adapter off)."""

    stage = "queries"
    required_columns = (C.SAMPLE_ID, C.MESSAGE)

    def __call__(self, batch: dict) -> dict:
        self._check(batch)
        seed = self.params.seed * 1_000_003 + int(batch[C.SAMPLE_ID][0])
        params = GenerationParams(self.params.max_new_tokens, self.params.temperature, self.params.top_p, seed)
        texts = self.engine.generate(list(batch[C.MESSAGE]), params, use_adapter=False, chat=False)
        return {C.SAMPLE_ID: batch[C.SAMPLE_ID], C.QUERY: np.array([parse_query(t) for t in texts], dtype=object)}


class LabelResponses(_EngineUDF):
    """The expert (source base + adapter) answers each query."""

    stage = "labels"
    required_columns = (C.SAMPLE_ID, C.QUERY)

    def __call__(self, batch: dict) -> dict:
        self._check(batch)
        responses = self.engine.generate(list(batch[C.QUERY]), self.params, use_adapter=True)
        return {**batch, C.RESPONSE: np.array(responses, dtype=object)}


class ScoreExcess(_EngineUDF):
    """Expert and amateur log-probs of every response token, from one base copy."""

    stage = "scores"
    required_columns = (C.SAMPLE_ID, C.QUERY, C.RESPONSE)

    def __call__(self, batch: dict) -> dict:
        self._check(batch)
        scored = self.engine.score(list(batch[C.QUERY]), list(batch[C.RESPONSE]))
        backend = getattr(self.engine, "scoring_backend", None)
        if backend and not getattr(self, "_backend_logged", False):  # vLLM's calibration verdict
            self.run.log_event(event="scoring_backend", stage=self.stage, backend=backend)
            self._backend_logged = True
        excess = [s.excess for s in scored]
        return table(
            {
                **{name: batch[name] for name in (C.SAMPLE_ID, C.QUERY, C.RESPONSE)},
                C.TOKEN_IDS: [s.token_ids for s in scored],
                C.OFFSET_STARTS: [s.offsets[:, 0] for s in scored],
                C.OFFSET_ENDS: [s.offsets[:, 1] for s in scored],
                C.EXPERT_LOGPROBS: [s.expert_logprobs for s in scored],
                C.AMATEUR_LOGPROBS: [s.amateur_logprobs for s in scored],
                C.EXCESS: excess,
                C.N_TOKENS: np.array([len(x) for x in excess], dtype=np.int64),
                C.SAMPLE_SCORE: sample_scores(excess),
            }
        )
