"""The transplant, as named stages on Ray: queries -> labels -> scores -> filter -> align -> train -> export.

    titok transplant --config configs/demo.yaml

Every stage writes Parquet (or the adapter) under ``run_dir/<stage>/`` and a completion marker; a
rerun of the same config reads complete stages back instead of recomputing them, so a run killed
after any stage resumes from there.
"""

from __future__ import annotations

import json
import random
import time

import numpy as np
import yaml

from titok import columns as C
from titok.config import ConfigError, TransplantConfig, validate_inputs
from titok.export import export_adapter
from titok.queries import DiversityFilter, build_query_prompt
from titok.runstate import RunDir
from titok.stages.alignment import AlignToTarget
from titok.stages.filtering import apply_filter_method
from titok.stages.inference import LabelResponses, ScoreExcess, WriteQueries
from titok.tasks import load_task
from titok.train.ray_train import run_training

__all__ = ["STAGES", "transplant"]

STAGES = ("queries", "labels", "scores", "filter", "align", "train", "export")


def _engine_kwargs(cfg: TransplantConfig, adapter: str | None) -> dict:
    e = cfg.engine
    return {"name": e.name, "base": cfg.source_base, "adapter": adapter, "dtype": e.dtype, "max_length": e.max_length,
            "batch_size": e.batch_size, "trust_remote_code": cfg.trust_remote_code, "vllm_score_tolerance": e.vllm_score_tolerance,
            "tensor_parallel_size": max(1, int(e.gpus_per_actor))}


def _actor_pool(cfg: TransplantConfig) -> dict:
    """map_batches arguments for a fixed-size pool of model-holding actors, spread over the nodes."""
    return {"concurrency": cfg.engine.actors, "batch_size": cfg.engine.batch_size, "num_cpus": 1,
            "num_gpus": cfg.engine.gpus_per_actor, "scheduling_strategy": "SPREAD"}


def write_queries(cfg: TransplantConfig, run: RunDir):
    """Rounds of few-shot query writing on an actor pool; the ROUGE-L filter runs over the whole pool.

    The pool is saved after every round (``queries.progress.json``), so a run that stops early (out
    of rounds, killed) keeps what it wrote: rerun, with more ``queries.max_rounds`` if need be, and it
    goes on from there.
    """
    import ray

    task = load_task(cfg.task, seed=cfg.split_seed)
    diversity = DiversityFilter([e["input"] for e in task.seed_examples], cfg.queries.rouge_l_max)
    params = {"max_new_tokens": cfg.queries.max_new_tokens, "temperature": cfg.queries.temperature,
              "top_p": cfg.queries.top_p, "seed": cfg.seed}
    progress_path = run.root / "queries.progress.json"
    key = run.fingerprint("", {"source_base": cfg.source_base, "task": cfg.task, "seed": cfg.seed, "split": cfg.split_seed,
                               "queries": cfg.queries.model_dump(exclude={"max_rounds"}), "pool": cfg.pool_size})
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
    if progress.get("key") != key:
        progress = {"key": key, "kept": [], "written": 0, "rounds": 0}
    diversity.kept = list(progress["kept"])
    for round_index in range(progress["rounds"], cfg.queries.max_rounds):
        if len(diversity.kept) >= cfg.pool_size:
            break
        rng = random.Random(f"{cfg.seed}:{round_index}")
        missing = cfg.pool_size - len(diversity.kept)
        # at least one full batch per actor: a round pays actor start-up whatever its size
        n_prompts = max(int(np.ceil(missing * cfg.queries.oversample)), cfg.engine.batch_size * cfg.engine.actors)
        written = progress["written"]
        prompts = [{C.SAMPLE_ID: written + i, C.MESSAGE: build_query_prompt(task.seed_examples, cfg.queries.few_shot, rng)}
                   for i in range(n_prompts)]
        generated = ray.data.from_items(prompts).map_batches(
            # the base writes queries with the adapter off, so the writer loads no adapter at all
            WriteQueries, fn_constructor_kwargs={"run_dir": str(run.root), "engine": _engine_kwargs(cfg, None),
                                                 "params": params}, **_actor_pool(cfg)
        ).take_all()
        for row in sorted(generated, key=lambda r: r[C.SAMPLE_ID]):
            if len(diversity.kept) < cfg.pool_size:
                diversity.offer(row[C.QUERY])
        progress.update(kept=diversity.kept, written=written + n_prompts, rounds=round_index + 1)
        progress_path.write_text(json.dumps(progress))
        print(f"  queries round {round_index + 1}: {len(diversity.kept)}/{cfg.pool_size} kept of "
              f"{progress['written']} written", flush=True)
    if len(diversity.kept) < cfg.pool_size:
        raise RuntimeError(
            f"only {len(diversity.kept)} of {cfg.pool_size} queries passed the ROUGE-L < {cfg.queries.rouge_l_max} filter "
            f"in {cfg.queries.max_rounds} rounds (kept so far: {progress_path}); rerun with more queries.max_rounds to "
            "continue from them, or raise queries.rouge_l_max, or lower filter.top_m"
        )
    return ray.data.from_items([{C.SAMPLE_ID: i, C.QUERY: q} for i, q in enumerate(diversity.kept)])


def label_responses(cfg: TransplantConfig, run: RunDir, queries):
    """The expert (source base + adapter) answers every query, greedy by default."""
    params = {"max_new_tokens": cfg.labels.max_new_tokens, "temperature": cfg.labels.temperature, "seed": cfg.seed}
    return queries.map_batches(LabelResponses, fn_constructor_kwargs={
        "run_dir": str(run.root), "engine": _engine_kwargs(cfg, cfg.source_adapter), "params": params}, **_actor_pool(cfg))


def score_excess(cfg: TransplantConfig, run: RunDir, labels):
    """Expert and amateur log-probs of every response token, one base copy per actor."""
    return labels.map_batches(ScoreExcess, fn_constructor_kwargs={
        "run_dir": str(run.root), "engine": _engine_kwargs(cfg, cfg.source_adapter)}, **_actor_pool(cfg))


def filter_samples_and_tokens(cfg: TransplantConfig, run: RunDir, scores):
    """Global top-M samples by mean excess, then the top-k% tokens inside them (or a baseline's choice)."""
    f = cfg.filter
    return apply_filter_method(scores, f.method, f.top_m, f.k, f.token_scope, f.group_size, cfg.seed)


def align_to_target(cfg: TransplantConfig, run: RunDir, kept):
    """Keep masks carried onto the target tokenizer (a tokenizer only: cheap CPU actors)."""
    return kept.map_batches(AlignToTarget, fn_constructor_kwargs={
        "target_base": cfg.target_base, "trust_remote_code": cfg.trust_remote_code},
        concurrency=1, batch_size=cfg.engine.batch_size, num_cpus=1)


def train_target(cfg: TransplantConfig, run: RunDir, aligned) -> dict:
    """A fresh LoRA on the target base, Ray Train + DeepSpeed; the adapter lands in ``train/adapter``."""
    train_rows = aligned.filter(lambda row: float(np.sum(row[C.TARGET_WEIGHTS])) > 0)
    config = {"train": cfg.train.model_dump(), "target_base": cfg.target_base, "seed": cfg.seed,
              "run_dir": str(run.root), "max_length": cfg.engine.max_length, "k": cfg.filter.k,
              "trust_remote_code": cfg.trust_remote_code}
    fit = run_training(train_rows.select_columns([C.QUERY, C.RESPONSE, C.TARGET_WEIGHTS]), config,
                       storage_path=str(run.stage_dir(_stage_path(cfg, "train")) / "ray"))
    if fit.error:
        raise fit.error
    fit.checkpoint.to_directory(str(run.stage_dir(_stage_path(cfg, "train")) / "adapter"))
    metrics = {k: v for k, v in (fit.metrics or {}).items() if isinstance(v, (int, float, str))}
    return {"rows": train_rows.count(), "metrics": metrics}


def export(cfg: TransplantConfig, run: RunDir) -> str:
    summary = run.summary(_stage_path(cfg, "train"))
    card = {"source_base": cfg.source_base, "source_adapter": cfg.source_adapter, "target_base": cfg.target_base,
            "task": cfg.task, "method": cfg.filter.method, "top_m": cfg.filter.top_m, "k": cfg.filter.k,
            "token_scope": cfg.filter.token_scope,
            "pool_size": cfg.pool_size, "deepspeed_stage": cfg.train.deepspeed_stage, "workers": cfg.train.workers,
            "train_metrics": summary.get("metrics", {}), "train_rows": summary.get("rows")}
    return str(export_adapter(run.stage_dir(_stage_path(cfg, "train")) / "adapter",
                              run.stage_dir(_stage_path(cfg, "adapter")), cfg.target_base, card))


def _stage_path(cfg: TransplantConfig, stage: str) -> str:
    """Where a stage's output lives in the run dir. Baselines and ablations share queries, labels and
    scores with TiTok and keep their own filter/align/train/adapter under ``<method>/``, so trying
    every method in one run dir loses nothing."""
    if cfg.filter.method == "titok" or stage in ("queries", "labels", "scores"):
        return stage
    return f"{cfg.filter.method}/{stage}"


def _stage_fields(cfg: TransplantConfig) -> dict:
    """The config fields each stage's output depends on (with its upstream's, via the fingerprint chain)."""
    engine = cfg.engine.model_dump(exclude={"actors", "gpus_per_actor"})
    return {
        "queries": {"source_base": cfg.source_base, "task": cfg.task, "seed": cfg.seed, "split": cfg.split_seed, "engine": engine,
                    "queries": cfg.queries.model_dump(), "pool": cfg.pool_size},
        "labels": {"adapter": cfg.source_adapter, "labels": cfg.labels.model_dump()},
        "scores": {"max_length": cfg.engine.max_length},
        "filter": cfg.filter.model_dump(),
        "align": {"target_base": cfg.target_base},
        "train": cfg.train.model_dump(),
    }


def _run_stage(run: RunDir, name: str, fingerprint: str, compute, timings: dict):
    """Reuse a complete stage, or compute it and mark it complete.

    ``compute`` returns a Dataset (persisted as Parquet and read back) or a dict of summary fields
    (a stage that writes its own files, like train).
    """
    import ray

    out = run.stage_dir(name)
    if run.is_complete(name, fingerprint):
        timings[name] = {"status": "cached", **run.summary(name)}
        print(f"[{name}] complete in {out}, reusing it", flush=True)
    else:
        print(f"[{name}] running", flush=True)
        started = time.perf_counter()
        run.start(name)
        produced = compute()
        summary = produced if isinstance(produced, dict) else {}
        if not isinstance(produced, dict):
            produced.write_parquet(str(out))
            summary = {"rows": ray.data.read_parquet(str(out)).count()}
        run.complete(name, fingerprint, seconds=round(time.perf_counter() - started, 1), **summary)
        timings[name] = {"status": "ran", **run.summary(name)}
    if not any(out.glob("*.parquet")):
        return None
    # read now: a lazy read feeding an actor pool needs a CPU of its own, and when the pool's actors
    # hold every CPU (2 actors on a 2-core node) the read never runs (seen)
    return ray.data.read_parquet(str(out)).materialize()


def transplant(cfg: TransplantConfig, until: str | None = None) -> dict:
    """Run (or resume) a transplant; returns per-stage status/timings and the adapter path."""
    import ray

    if until is not None and until not in STAGES:
        raise ConfigError(f"--until must be one of {STAGES}, got {until!r}")
    validate_inputs(cfg)
    if not ray.is_initialized():
        ray.init()  # joins the cluster in RAY_ADDRESS (ray job submit), else starts a local Ray
    run = RunDir(cfg.run_dir)
    (run.root / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))

    steps = {
        "queries": lambda _: write_queries(cfg, run),
        "labels": lambda queries: label_responses(cfg, run, queries),
        "scores": lambda labels: score_excess(cfg, run, labels),
        "filter": lambda scores: filter_samples_and_tokens(cfg, run, scores),
        "align": lambda kept: align_to_target(cfg, run, kept),
        "train": lambda aligned: train_target(cfg, run, aligned),
    }
    last = STAGES.index(until) if until else len(STAGES) - 1
    fields, timings, fingerprint, upstream = _stage_fields(cfg), {}, "", None
    for name in STAGES[: last + 1]:
        if name == "export":
            timings["export"] = {"status": "ran"}
            return {"run_dir": str(run.root), "stages": timings, "adapter": export(cfg, run)}
        fingerprint = run.fingerprint(fingerprint, fields[name])
        upstream = _run_stage(run, _stage_path(cfg, name), fingerprint, lambda: steps[name](upstream), timings)
    return {"run_dir": str(run.root), "stages": timings}


def format_summary(result: dict) -> str:
    lines = [f"{'stage':8s} {'status':7s} {'rows':>6s} {'seconds':>8s}"]
    for name, info in result["stages"].items():
        lines.append(f"{name:8s} {info['status']:7s} {str(info.get('rows', '')):>6s} {str(info.get('seconds', '')):>8s}")
    lines.append(f"run dir: {result['run_dir']}")
    if "adapter" in result:
        lines.append(f"adapter: {result['adapter']}  (load with peft.PeftModel.from_pretrained)")
    return "\n".join(lines)
