"""``titok eval``: score a base model (+ optional adapter) on a task's held-out examples.

    titok eval --base gemma3-270m --adapter runs/demo/transplant/adapter --task boolean_expressions

Generation (greedy) and option scoring run in a Ray Data actor pool; the metrics are computed on the
driver from the predictions. Reported: exact match after answer extraction, option log-likelihood
accuracy when the task has a closed answer set (see ``titok.metrics``), ROUGE-1/L for free-text
tasks, and the majority-label rate beside every accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from titok.engines import GenerationParams, build_engine
from titok.metrics import exact_match, extract_answer, majority_rate, option_loglik_choices, rouge
from titok.tasks import load_task

__all__ = ["EvaluateBatch", "evaluate"]


class EvaluateBatch:
    """Actor: greedy answers and, where a row has options, the option with the best mean log-prob."""

    def __init__(self, base: str, adapter: str | None, dtype: str, max_new_tokens: int, batch_size: int):
        self.engine = build_engine("transformers", base, adapter, dtype=dtype, batch_size=batch_size)
        self.params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.use_adapter = adapter is not None

    def __call__(self, batch: dict) -> dict:
        queries = [str(q) for q in batch["query"]]
        predictions = self.engine.generate(queries, self.params, use_adapter=self.use_adapter)
        options = [list(o) for o in batch["options"]]
        choices = np.full(len(queries), -1, dtype=np.int64)
        with_options = [i for i, o in enumerate(options) if o]
        if with_options:
            picked = option_loglik_choices(self.engine.model, self.engine.tokenizer,
                                           [queries[i] for i in with_options], [options[i] for i in with_options])
            choices[with_options] = picked
        return {"index": batch["index"], "prediction": np.array(predictions, dtype=object), "choice": choices}


def evaluate(base: str, adapter: str | None, task_spec: str, seed: int = 0, n_test: int = 100,
             dtype: str = "bfloat16", max_new_tokens: int = 96, batch_size: int = 16, actors: int = 1) -> dict:
    import ray

    if not ray.is_initialized():
        ray.init()
    task = load_task(task_spec, seed=seed, n_test=n_test)
    examples = task.test_examples
    rows = [{"index": i, "query": e["input"], "options": e.get("options") or task.answer_set or []}
            for i, e in enumerate(examples)]
    out = ray.data.from_items(rows).map_batches(
        EvaluateBatch, fn_constructor_kwargs={"base": base, "adapter": adapter, "dtype": dtype,
                                              "max_new_tokens": max_new_tokens, "batch_size": batch_size},
        concurrency=actors, batch_size=batch_size, num_cpus=1,
    ).take_all()
    out.sort(key=lambda r: r["index"])
    predictions = [r["prediction"] for r in out]
    targets = [e["target"] for e in examples]
    report = {"base": base, "adapter": adapter, "task": task.name, "seed": seed, "n": len(examples),
              "exact_match": exact_match(predictions, targets), "majority_rate": majority_rate(targets)}
    if rows[0]["options"]:
        options = [r["options"] for r in rows]
        report["option_accuracy"] = float(np.mean([o[r["choice"]] == t for o, r, t in zip(options, out, targets)]))
    if task.metric == "rouge":
        report.update(rouge(predictions, targets))
    report["examples"] = [{"input": e["input"], "target": t, "prediction": p, "extracted": extract_answer(p)}
                          for e, t, p in list(zip(examples, targets, predictions))[:5]]
    return report


def write_report(report: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))
