"""``titok compare``: TiTok against its baselines and ablations, on the user's tasks and targets.

    titok compare --config configs/compare.yaml --num-seeds 3

For every task: a source expert (given, or trained once with ``titok sft``). For every task and seed:
the synthetic queries, the expert's answers and their excess scores are computed once and shared by
every target and every method (their run-dir stages are copied, the fingerprints match, so the
pipeline reuses them). For every target: one transplant per method (``filter.method``), whose trainings
share one worker group that loads the target once (``pipeline.transplant_together``), then one
evaluation pass that loads the target once and scores the vanilla base and every adapter on the same
held-out examples. Everything lands under ``out_dir``; a rerun reuses every finished transplant and
evaluation, so a stopped compare resumes and a changed report costs nothing. The report is written by
``titok.workflows.report``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from titok.choices import PAPER_METHOD
from titok.config import METHODS, CompareConfig, ConfigError, load_compare_config

from titok.layout import budgets, row_label, run_config, share_stages, short_name
from titok.runstate import ADAPTER_WEIGHTS, RunDir
from titok.validate import check_model, check_task, validate_inputs

__all__ = ["METHODS", "CompareConfig", "load_compare_config", "run_compare", "short_name"]


def validate_compare(cfg: CompareConfig) -> None:
    """Every run's config, every model, task and given adapter, checked before anything computes."""
    from titok.validate import run_dir_problems

    for problem in run_dir_problems("out_dir", cfg.out_dir):
        raise ConfigError(problem)
    unknown = sorted(set(cfg.source.adapters) - set(cfg.tasks))
    if unknown:
        raise ConfigError(f"source.adapters: {unknown} are not among tasks {cfg.tasks}")
    cfg.source.sft_train()
    check_model("source_base", cfg.source_base)
    for target in cfg.targets:
        check_model("targets", target)
    for task in cfg.tasks:
        check_task("tasks", task, cfg.split_seed)
        for seed in cfg.seed_list:
            for target in cfg.targets:
                for method in cfg.methods:
                    run = run_config(cfg, task, seed, target, method, cfg.source.adapters.get(task, "<sft>"))
                    if task in cfg.source.adapters:
                        validate_inputs(run)


def source_adapter(cfg: CompareConfig, task: str) -> str:
    """The given source expert, or one trained by ``titok sft`` (once; reused when its folder is complete)."""
    if task in cfg.source.adapters:
        return cfg.source.adapters[task]
    out = Path(cfg.out_dir) / "sources" / short_name(task)
    if not (out / ADAPTER_WEIGHTS).is_file():
        print(f"[compare] training the source expert for {task} (titok sft)", flush=True)
        from titok.workflows.sft import train_source_adapter

        train = cfg.source.sft_train()
        train_source_adapter(cfg.source_base, task, out, train, seed=cfg.split_seed, n_train=cfg.source.train_examples)
    return str(out)


def run_compare(cfg: CompareConfig) -> Path:
    """All runs and evaluations (resuming what is done), then the report; returns the report folder."""
    from titok.workflows.evaluate import cached_evaluation
    from titok.workflows.pipeline import transplant_together
    from titok.progress import init_ray
    from titok.workflows.report import evaluation_row, write_compare_report

    validate_compare(cfg)
    init_ray()
    out = Path(cfg.out_dir)
    RunDir(out).claim()
    started = time.perf_counter()
    rows, timings, trainings, rates = [], [], {}, {}
    for task in cfg.tasks:
        adapter = source_adapter(cfg, task)
        engine = run_config(cfg, task, 0, cfg.targets[0], cfg.methods[0], adapter, budgets(cfg)[0]).engine
        expert = cached_evaluation(cfg.eval, cfg.split_seed, out / "evals" / short_name(task) / "source-expert.json", cfg.source_base,
                                   {"expert": adapter}, task, engine)["expert"]
        rows.append(evaluation_row(expert, task, cfg.source_base, "source expert", None))
        for seed in cfg.seed_list:
            first_run: Path | None = None
            for target in cfg.targets:
                variants: dict[str, str | None] = {"vanilla": None}
                for budget in budgets(cfg):
                    if first_run is not None:  # the source stages do not depend on target or budget
                        share_stages(first_run, Path(run_config(cfg, task, seed, target, PAPER_METHOD, adapter, budget).run_dir))
                    runs = [run_config(cfg, task, seed, target, variant, adapter, budget) for variant in cfg.methods]
                    print(f"[compare] {task} seed {seed} -> {target}: {', '.join(cfg.methods)} ({budget})", flush=True)
                    cell_started = time.perf_counter()
                    results = transplant_together(runs)  # one worker group loads the target for every method
                    timings.append({"task": task, "seed": seed, "target": target, "budget": budget,
                                    "seconds": round(time.perf_counter() - cell_started, 1),
                                    "methods": {variant: {"max_steps": run.train.max_steps,
                                                          "stages": {k: v.get("status") for k, v in result["stages"].items()}}
                                                for variant, run, result in zip(cfg.methods, runs, results)}})
                    for variant, run, result in zip(cfg.methods, runs, results):
                        label = row_label(cfg, variant, budget)
                        variants[label] = result["adapter"]
                        trainings[(task, target, label, seed)] = result["train"]
                        rates[(task, target, label, seed)] = result["train"]["metrics"].get("lr", run.train.lr)
                    first_run = first_run or Path(runs[0].run_dir).resolve()
                # greedy decoding on a fixed split: the vanilla target is the same for every seed
                if seed != cfg.seed_list[0]:
                    variants.pop("vanilla")
                reports = cached_evaluation(
                    cfg.eval, cfg.split_seed, out / "evals" / short_name(task) / short_name(target) / f"seed{seed}.json", target,
                    variants, task, engine)
                for name, report in reports.items():
                    row = evaluation_row(report, task, target, name, None if name == "vanilla" else seed)
                    rate = rates.get((task, target, name, seed))  # the searched rate's winner, else train.lr
                    rows.append(row if rate is None else row | {"lr": rate})
    elapsed = time.perf_counter() - started
    (out / "timings.json").write_text(json.dumps({"seconds": round(elapsed, 1), "runs": timings}, indent=2))
    return write_compare_report(cfg, rows, out / "report", elapsed, trainings)
