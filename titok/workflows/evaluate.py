"""``titok eval``: score a base model (+ optional adapters) on a task's held-out examples.

    titok eval --base gemma3-270m --adapter runs/demo/transplant/adapter --task boolean_expressions

Generation (greedy) and option scoring run in a Ray Data actor pool, on the configured engine
(``eval.engine``: transformers, or vLLM with each adapter as a LoRA request); the metrics are computed
on the driver from the predictions. Reported: exact match after answer extraction, option log-likelihood
accuracy when the task has a closed answer set (see ``titok.core.metrics``), ROUGE-1/L for free-text
tasks, and the majority-label rate beside every accuracy. Several adapters of one base are evaluated
in one pass (``evaluate_variants``): each actor loads the base once and switches adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from titok.choices import DEFAULT_ENGINE
from titok.engines import GenerationParams, build_engine
from titok.core.metrics import (answer_spread, answered, exact_matches, extract_answer, majority_rate,
                                option_loglik_choices, rouge_per_example)
from titok.tasks import load_task, reference_response

__all__ = ["EvaluateBatch", "cached_evaluation", "eval_engine", "evaluate", "evaluate_variants", "write_report"]


class EvaluateBatch:
    """Actor: for every variant (adapter name -> folder, None = the bare base), greedy answers and,
    where a row has options, the option with the best mean log-prob; on the configured engine
    (``engine``: ``build_engine``'s arguments, ``name`` among them), one base load for every variant,
    an adapter switched per variant (vLLM: a LoRA request)."""

    def __init__(self, base: str, variants: dict[str, str | None], engine: dict, max_new_tokens: int, threads: int = 1):
        import torch

        torch.set_num_threads(threads)  # on CPU the actor uses the cores it reserved
        engine = dict(engine)
        adapters = {name: path for name, path in variants.items() if path}
        self.engine = build_engine(engine.pop("name"), base, adapters or None, **engine)
        self.variants = variants
        self.params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)

    def __call__(self, batch: dict) -> dict:
        queries = [str(q) for q in batch["query"]]
        options = [list(o) for o in batch["options"]]
        with_options = [i for i, o in enumerate(options) if o]
        out: dict[str, list] = {"index": [], "variant": [], "prediction": [], "choice": []}
        for name, path in self.variants.items():
            if path:
                self.engine.select_adapter(name)
            predictions = self.engine.generate(queries, self.params, use_adapter=bool(path))
            choices = np.full(len(queries), -1, dtype=np.int64)
            if with_options:
                choices[with_options] = option_loglik_choices(
                    lambda q, r: self.engine.response_logprobs(q, r, use_adapter=bool(path)),
                    [queries[i] for i in with_options], [options[i] for i in with_options])
            out["index"].extend(batch["index"])
            out["variant"].extend([name] * len(queries))
            out["prediction"].extend(predictions)
            out["choice"].extend(choices)
        return {"index": np.array(out["index"], dtype=np.int64), "variant": np.array(out["variant"], dtype=object),
                "prediction": np.array(out["prediction"], dtype=object), "choice": np.array(out["choice"], dtype=np.int64)}


def eval_engine(settings, run_engine=None, max_length: int = 2048) -> dict:
    """``build_engine``'s arguments for an evaluation (``settings``: ``config.EvalSettings``):
    ``settings.engine``, else the runs' own engine (``run_engine``: an ``EngineConfig``, whose
    engine-specific settings an evaluation on the same engine takes too), else the default engine."""
    from titok.config import EngineConfig

    name = settings.engine or (run_engine.name if run_engine is not None else DEFAULT_ENGINE)
    source = run_engine if run_engine is not None and run_engine.name == name else EngineConfig(name=name)
    return {"name": name, "dtype": settings.dtype, "batch_size": settings.batch_size, "max_length": max_length,
            "settings": source.engine_settings()}


def answer_budget(base: str, examples: list[dict]) -> int:
    """Default generation budget: 1.25 x the longest reference response (rationale + answer, the
    format the adapters learn) in the base's tokens, + 8. Enough for a right answer; a base that
    rambles is cut early instead of costing the full budget on every example."""
    from titok.models import load_tokenizer

    tokenizer = load_tokenizer(base)
    longest = max(len(tokenizer(reference_response(e), add_special_tokens=False)["input_ids"]) for e in examples)
    return int(1.25 * longest) + 8


def _held_out(task_spec: str, seed: int, n_test: int):
    """The task, the held-out examples an evaluation scores, their targets and each one's options (a
    closed answer set is every example's options)."""
    task = load_task(task_spec, seed=seed, n_test=n_test)
    examples = task.test_examples
    return task, examples, [e["target"] for e in examples], [e.get("options") or task.answer_set or [] for e in examples]


def evaluate_variants(base: str, variants: dict[str, str | None], task_spec: str, seed: int = 0, n_test: int = 100,
                      dtype: str = "auto", max_new_tokens: int | None = None, batch_size: int = 16,
                      actors: int = 1, cpus_per_actor: int = 1, gpus_per_actor: float = 0.0,
                      engine: dict | None = None) -> dict[str, dict]:
    """One report per variant, all on the same held-out examples of the task split ``seed``; ``engine``:
    ``eval_engine``'s (default: the default engine at ``dtype`` and ``batch_size``)."""
    import ray

    from titok.progress import init_ray

    if not variants:
        raise ValueError("no variants to evaluate")
    init_ray()
    task, examples, targets, options = _held_out(task_spec, seed, n_test)
    max_new_tokens = max_new_tokens or answer_budget(base, examples)
    rows = [{"index": i, "query": e["input"], "options": o} for i, (e, o) in enumerate(zip(examples, options))]
    out = ray.data.from_items(rows).map_batches(
        EvaluateBatch, fn_constructor_kwargs={"base": base, "variants": variants, "max_new_tokens": max_new_tokens,
                                              "engine": engine or {"name": DEFAULT_ENGINE, "dtype": dtype,
                                                                   "batch_size": batch_size},
                                              "threads": cpus_per_actor},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size, num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
    ).take_all()
    reports = {}
    for name, adapter in variants.items():
        mine = sorted((r for r in out if r["variant"] == name), key=lambda r: r["index"])
        predictions = [r["prediction"] for r in mine]
        # per example too (the same examples for every variant): compare's intervals and paired tests
        text, per_example = answer_metrics(predictions, targets, options)
        if rows[0]["options"]:
            per_example["option_accuracy"] = [float(row["options"][r["choice"]] == t)
                                              for row, r, t in zip(rows, mine, targets, strict=True)]
        if task.metric == "rouge":
            per_example.update(rouge_per_example(predictions, targets))
        report = {"base": base, "adapter": adapter, "task": task.name, "seed": seed, "n": len(examples),
                  "max_new_tokens": max_new_tokens, "majority_rate": majority_rate(targets),
                  **{name: float(np.mean(values)) for name, values in per_example.items()},
                  **text, "per_example": per_example}
        report["examples"] = [{"input": e["input"], "target": t, "prediction": p, "extracted": extract_answer(p)}
                              for e, t, p in list(zip(examples, targets, predictions))[:5]]
        report["predictions"] = predictions  # every one, in example order: to read why a row misses
        reports[name] = report
    return reports


def answer_metrics(predictions: list[str], targets: list[str], options: list[list[str]]) -> tuple[dict, dict]:
    """What is read off the predictions' text: exact match (also per example), the spread of answers and,
    where examples have options, the share answered. Recomputed from a cached report's predictions
    (``cached_evaluation``), so a fix to how answers are read needs no new generation."""
    per_example = exact_matches(predictions, targets)
    fields = {"exact_match": float(np.mean(per_example)), **answer_spread(predictions, targets)}
    if any(options):
        fields["answered_share"] = float(np.mean(answered(predictions, options)))
    return fields, {"exact_match": per_example}


def _reread(report: dict, targets: list[str], options: list[list[str]]) -> dict:
    fields, per_example = answer_metrics(report["predictions"], targets, options)
    return {**report, **fields, "per_example": {**report["per_example"], **per_example}}


def evaluate(base: str, adapter: str | None, task_spec: str, seed: int = 0, n_test: int = 100,
             dtype: str = "auto", max_new_tokens: int | None = None, batch_size: int = 16, actors: int = 1,
             **placement) -> dict:
    """One base with one adapter (or none); ``placement``: ``evaluate_variants``' keyword arguments."""
    name = "adapter" if adapter else "vanilla"
    return evaluate_variants(base, {name: adapter}, task_spec, seed, n_test, dtype, max_new_tokens, batch_size,
                             actors, **placement)[name]


def write_report(report: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))


REPLACED_KEPT = 16  # reports of weights no variant has any more, kept per evaluation file (~100 KB each at 200 examples)
_REPORT_VERSION = 2  # 2: the spread of answers (collapse); an older cached report lacks it, so it is redone


def cached_evaluation(settings, split_seed: int, path: Path, base: str, variants: dict[str, str | None], task: str,
                      run_engine=None) -> dict:
    """Reports per variant (``settings``: ``config.EvalSettings``; ``run_engine``: see ``eval_engine``).

    Kept per variant in ``path``: a variant is evaluated again only when its adapter's weights changed
    (or the base, the engine or the eval settings did), so adding a method to a compare or an adapter to
    a zoo evaluates that one alone. Variants of earlier calls stay in the file for later ones, and the
    reports of weights a variant no longer has (its stage recomputed with other settings) stay under
    ``replaced`` by weights digest, the last ``REPLACED_KEPT``: settings put back, the run dir restores
    the stage it set aside, and its adapter is not evaluated again. A kept report's answers are read
    again from its predictions (``answer_metrics``), so its exact match, spread and share answered
    follow the metrics of the code that reads them."""
    import time

    from titok.layout import adapter_digest
    from titok.runstate import write_atomic

    engine = eval_engine(settings, run_engine)
    shared = {"base": base, "task": task, "split": split_seed, "engine": engine["name"], "report": _REPORT_VERSION,
              "eval": settings.model_dump(exclude=set(settings.PLACEMENT_FIELDS) | {"engine"})}
    digests = {name: adapter_digest(adapter) for name, adapter in variants.items()}
    cached = json.loads(path.read_text()) if path.is_file() else {}
    key, reports = cached.get("key", {}), cached.get("reports", {})
    known, replaced = {}, {}  # name -> (digest, report) of the file; digest -> report of weights replaced
    if {field: value for field, value in key.items() if field != "variants"} == shared:
        known = {name: (digest, reports[name]) for name, digest in key.get("variants", {}).items() if name in reports}
        replaced = cached.get("replaced", {})
    missing = {name: adapter for name, adapter in variants.items() if name not in known or known[name][0] != digests[name]}
    had = {known[name][0]: known[name][1] for name in missing if name in known}  # the weights they had: newest last
    replaced = {**{d: r for d, r in replaced.items() if d not in had}, **had}
    # weights evaluated once: a variant whose adapter another has (kd's row under both budgets, a zoo
    # adapter listed twice, weights it had before) takes that one's report, kept or made in this pass
    kept_weights = {**replaced, **{digest: report for digest, report in known.values()}}
    evaluating = {}  # digest -> the one variant this pass evaluates for those weights
    for name, adapter in missing.items():
        if digests[name] in kept_weights:
            known[name] = (digests[name], kept_weights[digests[name]] | {"adapter": adapter})
        else:
            evaluating.setdefault(digests[name], name)
    to_evaluate = {name: variants[name] for name in evaluating.values()}
    if to_evaluate:
        started = time.perf_counter()
        fresh = evaluate_variants(base, to_evaluate, task, seed=split_seed, n_test=settings.examples, dtype=settings.dtype,
                                  max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                                  cpus_per_actor=settings.cpus_per_actor, gpus_per_actor=settings.gpus_per_actor,
                                  engine=engine)
        for name, report in fresh.items():
            report["eval_seconds"] = round(time.perf_counter() - started, 1)  # the pass that evaluated it
            known[name] = (digests[name], report)
    for name in missing:
        if name not in to_evaluate and digests[name] in evaluating:  # a twin of one evaluated just now
            known[name] = (digests[name], known[evaluating[digests[name]]][1] | {"adapter": variants[name]})
    cached_names = [name for name in variants if name not in to_evaluate]
    changed = bool(missing)
    if cached_names:  # answers re-read with today's metrics from the kept predictions (no generation)
        _, _, targets, options = _held_out(task, split_seed, settings.examples)
        for name in cached_names:
            digest, report = known[name]
            known[name] = (digest, _reread(report, targets, options))
            changed = changed or known[name][1] != report
    if changed:
        current = {d for d, _ in known.values()}
        replaced = {d: r for d, r in replaced.items() if d not in current}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"key": shared | {"variants": {n: d for n, (d, _) in known.items()}},
                                       "reports": {n: r for n, (_, r) in known.items()},
                                       "replaced": dict(list(replaced.items())[-REPLACED_KEPT:])}, indent=2))
    return {name: known[name][1] for name in variants}
