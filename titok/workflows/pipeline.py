"""The transplant, as named stages on Ray: queries -> labels -> scores -> filter -> align -> train -> export.

    titok transplant --config configs/demo.yaml

Every stage writes Parquet (or the adapter) under ``run_dir/<stage>/`` and a completion marker; a
rerun of the same config reads complete stages back instead of recomputing them, so a run killed
after any stage resumes from there. The source model serves queries, labels and scores from one
set of engine actors (``stages.fleet``), started when the first of them runs and freed before
training. Before any of it, the config's plan must fit the cluster Ray reports (``titok.workflows.plan``).

Which stage waits for all of its upstream, and why:
- queries -> labels: waits. A query is kept only if its ROUGE-L to every kept query is under the
  bound, which is known once the round's whole pool is in; the pool is written round by round.
- labels -> scores: streams. Each batch is scored on its engine as soon as it is labelled (the
  expert's log-probs come from generation, only the amateur pass is left); both stages persist.
- scores -> filter: waits, by definition: the top-M samples and a global top-k% are over all rows.
- filter -> align: could stream, and does not: aligning a few hundred kept samples takes seconds on
  the tokenizer, less than one more hand-off would cost.
- align -> train: waits: epochs read every row, and the engines must have freed their GPUs first.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

from titok import columns as C, progress, signals
from titok.choices import ENGINES, FILTER_METHODS, STAGES
from titok.config import ConfigError, TransplantConfig
from titok.engines.placement import actor_options
from titok.export import export_adapter
from titok.layout import SOURCE_STAGES, adapter_digest, stage_path
from titok.gpu_facts import GIB
from titok.workflows.plan import Plan, Resources, cluster_resources, make_plan
from titok.readiness import wait_for_free_gpus, wait_for_resources
from titok.runstate import RUN_CONFIG, RunDir, dataset_of, run_stage
from titok.stages.alignment import AlignToTarget
from titok.stages.filtering import apply_filter_method
from titok.stages.fleet import EngineFleet
from titok.stages.queries import write_query_pool
from titok.train.job import TrainingJob
from titok.train.ray_train import TrainOutcome, copy_adapter, train_adapter
from titok.validate import validate_inputs

__all__ = ["SOURCE_STAGES", "STAGES", "SourceEngines", "StageRunner", "check_plan", "format_summary", "teaching_rows",
           "train_together", "transplant", "transplant_together"]



class SourceEngines:
    """The source model's engine fleet with its adapters (``{name: folder}``), started on first use and
    released once scoring is done. A transplant has one adapter, ``default``; a zoo has them all.
    ``free_gpu_bytes``: what each GPU must have free for the stages after the engines (the plan's)."""

    def __init__(self, cfg: TransplantConfig, run_dir: str, adapters: dict[str, str], free_gpu_bytes: int = 0):
        self.cfg, self.run_dir, self.adapters, self.fleet = cfg, run_dir, adapters, None
        self.free_gpu_bytes, self.held = free_gpu_bytes, {}  # held: {node id: GPU indices} of closed engines
        self.run_log = RunDir(run_dir)

    def __call__(self) -> EngineFleet:
        if self.fleet is None:
            e, cfg = self.cfg.engine, self.cfg
            engine = {"name": e.name, "base": cfg.source_base, "adapter": self.adapters, "dtype": e.dtype,
                      "max_length": e.max_length, "batch_size": e.batch_size, "trust_remote_code": cfg.trust_remote_code,
                      "settings": e.engine_settings(), "gpus": e.gpus_per_actor}
            options = actor_options(e.name, e.gpus_per_actor, e.cpus_per_actor, e.tensor_parallel_size, e.pipeline_parallel_size)
            rows_per_call = None if ENGINES[e.name].batches_continuously else e.batch_size
            self.fleet = EngineFleet(self.run_dir, engine, e.actors, options, rows_per_call, e.cpus_per_actor,
                                     max_restarts=e.max_restarts)
        return self.fleet

    def close(self) -> None:
        """Shut the engines down (on an error too); ``release`` then waits for the GPUs they held."""
        if self.fleet is None:
            return
        fleet, self.fleet = self.fleet, None
        fleet.close()
        self.held = fleet.gpus
        self.run_log.log_event(event="engines_closed", stage="engine", peak_rss_mib=fleet.peak_rss_mib, gpus=fleet.gpus)

    def release(self) -> None:
        """Close the engines and wait until the GPUs they held have the memory the next stage needs."""
        self.close()
        held, self.held = self.held, {}
        if held and self.free_gpu_bytes:
            readings = wait_for_free_gpus(held, self.free_gpu_bytes, self.cfg.cluster.gpu_release_timeout_s)
            self.run_log.log_event(event="gpus_free", stage="engine", need_gib=round(self.free_gpu_bytes / GIB, 1),
                                   free_gib={f"{r.node_ip}:{r.index}": round(r.free / GIB, 1) for r in readings})


_TOKENIZER_ROWS_PER_CALL = 64  # alignment without a model: any block size gives the same rows

def label_responses(cfg: TransplantConfig, queries: pa.Table, engines: SourceEngines, adapter: str,
                    then_score: bool = False) -> tuple[pa.Table, pa.Table | None]:
    """The expert (source base + ``adapter``) answers every query, greedy by default: ``(labels, scores)``.
    ``then_score``: each batch is scored on its engine as soon as it is labelled (labels stream into
    scores, no wait for the whole stage); else scores is None and the scores stage does it."""
    params = {"max_new_tokens": cfg.labels.max_new_tokens, "temperature": cfg.labels.temperature, "seed": cfg.seed}
    operation = "labels+scores" if then_score and queries.num_rows else "labels"
    out = engines().map(queries, operation,
                        {"generation": params, "adapter": adapter, "top_logprobs": cfg.labels.top_logprobs})
    labels, scores = out if isinstance(out, tuple) else (out, None)
    rescore = labels.column(C.EXPERT_LOGPROBS).null_count  # answers that do not re-tokenize to their own tokens
    note = (f"{labels.num_rows - rescore} answers keep their expert log-probs from generation, {rescore} are "
            f"rescored{' (scored as they came)' if scores is not None else ''}")
    bar = progress.current()
    bar.add_note(note) if bar else print(f"  labels: {note}", flush=True)
    engines.run_log.log_event(event="expert_logprobs_from_generation", kept=labels.num_rows - rescore, rescored=rescore,
                              streamed_into_scores=scores is not None)
    return labels, scores


def score_excess(cfg: TransplantConfig, labels: pa.Table, engines: SourceEngines, adapter: str):
    """Expert and amateur log-probs of every response token, one base copy per engine."""
    return engines().map(labels, "scores", {"adapter": adapter, "top_logprobs": cfg.labels.top_logprobs})


def filter_samples_and_tokens(cfg: TransplantConfig, scores: pa.Table):
    """Global top-M samples by mean excess, then the top-k% tokens inside them (or a baseline's choice)."""
    f = cfg.filter
    return apply_filter_method(dataset_of(scores, cfg.engine.batch_size), f.method, f.top_m, f.k, f.token_scope,
                               f.group_size, cfg.seed)


def align_settings(cfg: TransplantConfig) -> dict:
    """What the alignment of a kept sample depends on (runs that agree on it may align in one pass)."""
    return {"target_base": cfg.target_base, "trust_remote_code": cfg.trust_remote_code,
            "reference": cfg.filter.token_reference, "k": cfg.filter.k, "dtype": cfg.engine.dtype,
            "batch_size": cfg.filter.reference_batch_size, "gpus": cfg.filter.reference_gpus if cfg.train.use_gpu else 0,
            "distill": FILTER_METHODS[cfg.filter.method].distills}


def align_to_target(cfg: TransplantConfig, kept, log_dir: str | None = None):
    """Keep masks carried onto the target tokenizer (a tokenizer only: cheap CPU actors). Rows are
    aligned one by one and keep their other columns, so several runs' kept rows may go in one pass.
    ``kept``: an Arrow table, or a Ray Dataset still being computed (a zoo's filter pass)."""
    with_model = cfg.filter.token_reference != "source_amateur"  # the target base scores the kept samples
    rows_per_call = cfg.filter.reference_batch_size if with_model else _TOKENIZER_ROWS_PER_CALL
    import ray

    kept = dataset_of(kept, rows_per_call) if isinstance(kept, pa.Table) else kept
    return kept.map_batches(
        AlignToTarget, fn_constructor_kwargs={**align_settings(cfg), "run_dir": log_dir or cfg.run_dir},
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=rows_per_call,
        num_cpus=cfg.train.cpus_per_worker if with_model else 1, num_gpus=cfg.filter.reference_gpus if with_model and cfg.train.use_gpu else 0)


def training_job(cfg: TransplantConfig, run: RunDir, aligned: pa.Table, kept_rates: Path | None = None):
    """``(dataset, TrainingJob)`` of the target training: the aligned samples that teach something.
    ``kept_rates``: where the rates of an lr_search are kept (``StageRunner.kept_rates``)."""
    import ray

    job = TrainingJob.of(cfg.train, cfg.target_base, cfg.seed, str(run.root), cfg.train_max_length, cfg.filter.k,
                         cfg.trust_remote_code, str(kept_rates) if kept_rates else None)
    return ray.data.from_arrow(teaching_rows(aligned)), job


def teaching_rows(aligned: pa.Table) -> pa.Table:
    """The aligned samples the target trains on: those with a kept token on the target tokenizer."""
    teaches = pa.array([float(np.sum(w)) > 0 for w in aligned.column(C.TARGET_WEIGHTS).to_pylist()], type=pa.bool_())
    columns = [C.SAMPLE_ID, C.QUERY, C.RESPONSE, C.TARGET_WEIGHTS]
    return aligned.filter(teaches).select(columns + [C.TARGET_TEACHER] * (C.TARGET_TEACHER in aligned.column_names))


def train_target(cfg: TransplantConfig, run: RunDir, aligned: pa.Table, trained: TrainOutcome | None = None,
                 kept_rates: Path | None = None) -> dict:
    """A fresh LoRA on the target base, Ray Train + DeepSpeed; the adapter lands in ``train/adapter``.
    ``trained``: the outcome of a training already run with others (a zoo's worker group)."""
    stage = run.stage_dir(_stage_path(cfg, "train"))
    outcome = trained or train_adapter(*training_job(cfg, run, aligned, kept_rates), storage_path=str(stage / "ray"))
    copy_adapter(outcome, stage / "adapter")
    metrics = {k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float, str))}
    summary = {"rows": teaching_rows(aligned).num_rows, "metrics": metrics}
    if outcome.val_losses:
        summary["val_losses"] = outcome.val_losses
    if outcome.lr_search:
        from titok.core.validation_split import ruled_out

        summary["lr_search"] = {f"{lr:g}": curve for lr, curve in outcome.lr_search.items()}
        summary["lr_answers_end"] = {f"{lr:g}": share for lr, share in outcome.answers_end.items()}
        summary["lr_answers_spread"] = {f"{lr:g}": spread for lr, spread in outcome.answers_spread.items() if spread}
        # decided once here; the summary line and the compare report read it
        summary["lr_ruled_out"] = [f"{lr:g}" for lr in sorted(ruled_out(outcome.answers_end, outcome.answers_spread))]
        run.log_event(event="lr_chosen", stage="train", lr=metrics["lr"], val_losses=summary["lr_search"],
                      answers_end=summary["lr_answers_end"], answers_spread=summary["lr_answers_spread"],
                      ruled_out=summary["lr_ruled_out"])
    return summary


def export(cfg: TransplantConfig, run: RunDir) -> str:
    summary = run.summary(_stage_path(cfg, "train"))
    card = {"kind": "transplant", "source_base": cfg.source_base, "source_adapter": cfg.source_adapter, "target_base": cfg.target_base,
            "task": cfg.task, "method": cfg.filter.variant, "top_m": cfg.filter.top_m, "k": cfg.filter.k,
            "token_scope": cfg.filter.token_scope,
            "pool_size": cfg.pool_size, "deepspeed_stage": cfg.train.deepspeed_stage, "workers": cfg.train.workers,
            "train_metrics": summary.get("metrics", {}), "train_rows": summary.get("rows")}
    return str(export_adapter(run.stage_dir(_stage_path(cfg, "train")) / "adapter",
                              run.stage_dir(_stage_path(cfg, "adapter")), cfg.target_base, card,
                              cfg.trust_remote_code))


def _stage_path(cfg: TransplantConfig, stage: str) -> str:
    """Where a stage's output lives in the run dir (``titok.layout.stage_path``)."""
    return stage_path(cfg.filter.variant, stage)


def _stage_fields(cfg: TransplantConfig) -> dict:
    """The config fields each stage's output depends on (with its upstream's, via the fingerprint chain);
    where and on how many devices a stage runs is left out, since it does not change the result. The
    labels key on the source adapter's weights, not its path: a copy or another spelling of the folder
    reuses them, and an adapter retrained in place is labelled again."""
    engine = cfg.engine.model_dump(exclude=set(cfg.engine.PLACEMENT_FIELDS))
    return {
        "queries": {"source_base": cfg.source_base, "task": cfg.task, "seed": cfg.seed, "split": cfg.split_seed, "engine": engine,
                    "queries": cfg.queries.model_dump(), "pool": cfg.pool_size},
        "labels": {"adapter": adapter_digest(cfg.source_adapter), "labels": cfg.labels.model_dump()},
        "scores": {"max_length": cfg.engine.max_length},
        "filter": cfg.filter.model_dump(exclude=set(cfg.filter.PLACEMENT_FIELDS)),
        "align": {"target_base": cfg.target_base, "reference": cfg.filter.token_reference},
        "train": cfg.train.model_dump(exclude=set(cfg.train.PLACEMENT_FIELDS)
                                      | (set() if cfg.train.lr_search else set(_RATE_CHOICE_ONLY))),
    }


# train settings that change only which rate an lr_search keeps, never a rate's weights: out of the
# train fingerprint without a search, and out of the key under which each trained rate is kept
_RATE_CHOICE_ONLY = ("validation_generations",)


# _stage_fields' keys as a user sets them (the fingerprints hash the keys above, so those stay), for
# the line that says which settings changed since a stage completed
_SECTION = {"filter": "filter", "train": "train", "scores": "engine"}
_AS_SET = {"split": "split_seed", "pool": "pool_size", "reference": "filter.token_reference",
           "adapter": "source_adapter (its weights)"}


def _settings(stage: str, fields: dict, upstream: str) -> dict:
    """What ``run_stage`` records of a stage's settings: its upstream fingerprint and its fields, named
    as in the config."""
    named = {_AS_SET.get(key, key): value for key, value in fields.items()}
    return {"upstream": upstream, "fields": {_SECTION[stage]: named} if stage in _SECTION else named}


_PROVIDABLE = {"scores", "filter", "align", "train"}  # the stages whose step takes rows made elsewhere


class StageRunner:
    """One run directory's stages, in order: ``run(name)`` runs or reuses the next one.

    The fingerprint chain and each stage's rows pass from one call to the next, so a caller may run
    the stages of several run directories interleaved (a zoo runs every adapter's scores before
    any training), and each directory ends exactly as a lone transplant would leave it.
    """

    def __init__(self, cfg: TransplantConfig, engines: SourceEngines, adapter: str = "default"):
        self._cfg, self._run, self.engines, self.adapter = cfg, RunDir(cfg.run_dir), engines, adapter
        self.stream_scores = True  # labels stream into scores (off when the run stops after labels)
        self.fields, self._timings, self.fingerprint, self._rows = _stage_fields(cfg), {}, "", None
        self._position = 0  # how many stages have run (or been reused), in STAGES order
        # rows a stage gets made already (``provide``): "scores" with the labels, "filter"/"align" rows or
        # a "train" outcome made together with other runs' (a zoo)
        self._provided: dict = {}
        self.steps = {
            "queries": lambda _: write_query_pool(cfg, self._run, engines),
            "labels": self._labels,
            "scores": self._provided_or("scores", lambda labels: score_excess(cfg, labels, engines, adapter)),
            "filter": self._provided_or("filter", lambda scores: filter_samples_and_tokens(cfg, scores)),
            "align": self._provided_or("align", lambda kept: align_to_target(cfg, kept)),
            "train": lambda aligned: train_target(cfg, self._run, aligned, self._provided.pop("train", None),
                                                  self.kept_rates()),
        }

    @property
    def cfg(self) -> TransplantConfig:
        return self._cfg

    @property
    def run(self) -> RunDir:
        return self._run

    @property
    def rows(self):
        """The rows of the last stage run or reused (None before the first)."""
        return self._rows

    @property
    def timings(self) -> dict:
        """Per stage run or reused: its status and seconds (a copy)."""
        return dict(self._timings)

    @property
    def next_stage(self) -> str | None:
        return STAGES[self._position] if self._position < len(STAGES) else None

    def provide(self, **made) -> None:
        """Rows (or, for train, the outcome) of the next stages, made elsewhere (a zoo's shared pass):
        ``provide(filter=kept, align=aligned)``. Refused unless they are the next stages, in order, so a
        provided result can never be taken by a stage it was not made for."""
        ahead = list(STAGES[self._position:self._position + len(made)])
        if list(made) != ahead or not set(made) <= _PROVIDABLE:
            raise ValueError(f"{list(made)} are not the next stages of {self._run.root} that take made rows (next: "
                             f"{ahead or 'none'}; made rows go to {sorted(_PROVIDABLE)})")
        self._provided.update(made)

    def has_provided(self, stage: str) -> bool:
        return stage in self._provided

    def _labels(self, queries: pa.Table) -> pa.Table:
        labels, scores = label_responses(self._cfg, queries, self.engines, self.adapter, self.stream_scores)
        if scores is not None:  # the scores stage persists them (a run killed before it rescores from labels)
            self._provided["scores"] = scores
        return labels

    def _provided_or(self, stage: str, compute):
        """The stage's rows made already (scores streamed with the labels, a zoo's shared pass), else its own."""
        return lambda rows: self._provided.pop(stage) if stage in self._provided else compute(rows)

    def fingerprint_of(self, name: str) -> str:
        """The fingerprint stage ``name`` will have (stages before it need not have run)."""
        fingerprint = ""
        for stage in STAGES[: STAGES.index(name) + 1]:
            fingerprint = self._run.fingerprint(fingerprint, self.fields[stage])
        return fingerprint

    def is_complete(self, name: str) -> bool:
        """Stage ``name`` is already done for this config (a rerun will reuse it)."""
        return self._run.is_complete(_stage_path(self._cfg, name), self.fingerprint_of(name))

    def training_job(self):
        """The target training's ``(dataset, config)``, once align has run (see ``training_job``)."""
        return training_job(self._cfg, self._run, self._rows, self.kept_rates())

    def kept_rates(self) -> Path | None:
        """Where this run keeps each trained rate of its ``train.lr_search`` (None without one): a folder
        per everything the training depends on but the rates (its rows, the recipe), so a rerun that
        widens or narrows the search trains only rates not tried yet. Folders of another recipe are
        dropped, as a rerun with another config replaces a stage's output."""
        if not self._cfg.train.lr_search:
            return None
        recipe = {k: v for k, v in self.fields["train"].items() if k not in ("lr", "lr_search", *_RATE_CHOICE_ONLY)}
        folder = self._run.root / _stage_path(self._cfg, "lr-rates")
        key = self._run.fingerprint(self.fingerprint_of("align"), recipe)
        for other in folder.glob("*") if folder.is_dir() else ():
            if other.name != key:
                shutil.rmtree(other)
        return folder / key

    def run_next(self, name: str) -> None:
        if name != self.next_stage:
            raise ValueError(f"stage {name!r} is not the next one of {self._run.root} ({self.next_stage!r} is)")
        self._position += 1
        if name == "export":
            self._timings["export"] = {"status": "ran"}
            self.adapter_path = export(self._cfg, self._run)
            return
        settings = _settings(name, self.fields[name], self.fingerprint)
        self.fingerprint = self._run.fingerprint(self.fingerprint, self.fields[name])
        self._rows = run_stage(self._run, _stage_path(self._cfg, name), self.fingerprint,
                               lambda: self.steps[name](self._rows), self._timings,
                               resumable=("ray",) if name == "train" else (), settings=settings)  # Ray Train's checkpoints

    def result(self) -> dict:
        # which dtype each model ran in, and why (dtype: auto decides per device)
        dtypes = {e["stage"]: e["dtype"] for e in self._run.events() if e.get("event") == "model_load" and e.get("dtype")}
        out = {"run_dir": str(self._run.root), "stages": self._timings, "dtypes": dtypes}
        trained = self._timings.get(_stage_path(self._cfg, "train"))  # "kd/train" for kd: the method's own
        if trained is not None:
            out["train"] = trained
        return {**out, "adapter": self.adapter_path} if hasattr(self, "adapter_path") else out


def transplant(cfg: TransplantConfig, until: str | None = None) -> dict:
    """Run (or resume) a transplant; returns per-stage status/timings and the adapter path."""
    if until is not None and until not in STAGES:
        raise ConfigError(f"--until must be one of {STAGES}, got {until!r}")
    runner = _started(cfg)
    runner.stream_scores = until != "labels"
    try:
        _run_until(runner, until or "export")
    finally:
        runner.engines.close()
    return runner.result()


def transplant_together(cfgs: list[TransplantConfig], groups_at_once: int = 1) -> list[dict]:
    """Several transplants (``compare``'s methods on one target), each ending as it would alone, whose
    target trainings share worker groups: each runs alone up to align (a later one reuses the source
    stages an earlier one wrote in its run dir), then every training not yet complete runs in one Ray
    Train run per worker group (``train_together``), so the target loads once for all of them instead
    of once per run; then each takes its outcome and exports. A failed training is raised once every
    other run has exported: nothing another run trained is lost."""
    by_method = len({cfg.filter.variant for cfg in cfgs}) == len(cfgs)  # names on the training's progress line
    runners = {}
    for i, cfg in enumerate(cfgs):
        runner = runners[cfg.filter.variant if by_method else f"run{i}"] = _started(cfg)
        try:
            _run_until(runner, "align")
        finally:
            runner.engines.close()
    storage = Path(cfgs[0].run_dir) / "trainings"
    train_together(runners, list(runners), groups_at_once, storage)
    failures = []
    for runner in runners.values():
        try:
            _run_until(runner, "export")
        except Exception as err:  # noqa: BLE001 - raised below, once the others have their adapters
            failures.append(err)
    shutil.rmtree(storage, ignore_errors=True)  # the groups' checkpoints: every outcome is taken
    if failures:
        raise failures[0]
    return [runner.result() for runner in runners.values()]


def train_together(runners: dict[str, StageRunner], names: list[str], groups_at_once: int, storage: Path) -> None:
    """Train every named run whose train stage is not complete, in as few worker groups as can share a
    loaded target (``ray_train.group_jobs``: same ``WorkerGroup``; ZeRO-3 alone), ``groups_at_once`` at
    a time; each runner is given its outcome (an adapter or the error that ended it), which its train
    stage then takes. A group resubmitted after a crash resumes from its checkpoints under ``storage``."""
    from titok.train.ray_train import group_jobs, run_training

    jobs = {}
    for name in names:
        if runners[name].is_complete("train"):
            continue
        try:
            jobs[name] = runners[name].training_job()
        except Exception as err:  # noqa: BLE001 - that run's failure alone
            runners[name].provide(train=TrainOutcome(name, error=err))

    def fit(group: list[str]) -> dict:
        key = hashlib.sha256(json.dumps([[n, runners[n].fingerprint_of("train")] for n in group]).encode()).hexdigest()[:12]
        print(f"[train] {group} on one worker group", flush=True)
        started = time.perf_counter()
        try:
            outcomes = run_training({n: jobs[n] for n in group}, str(storage / key), log_dir=str(storage.parent))
        except Exception as err:  # noqa: BLE001 - the group's failure is its runs', not the caller's
            outcomes = {n: TrainOutcome(n, error=err) for n in group}
        RunDir(storage.parent).log_event(event="shared_pass", stage="train", adapters=group,
                                         seconds=round(time.perf_counter() - started, 1))
        return outcomes

    for outcomes in signals.thread_map(fit, group_jobs({n: job for n, (_, job) in jobs.items()}, groups_at_once),
                                       groups_at_once):
        for name, outcome in outcomes.items():
            runners[name].provide(train=outcome)


def _started(cfg: TransplantConfig) -> StageRunner:
    """Inputs checked, Ray up, the plan checked against the cluster and written, the run dir claimed:
    the run's stage runner, before its first stage."""
    validate_inputs(cfg)
    progress.init_ray()  # joins the cluster in RAY_ADDRESS (ray job submit), else starts a local Ray
    wait_for_resources([cfg])  # on a cluster, GPU nodes may still be registering
    plan = check_plan(cfg, cluster_resources())  # before any model loads
    run = RunDir(cfg.run_dir)
    run.claim()
    (run.root / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
    (run.root / RUN_CONFIG).write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    engines = SourceEngines(cfg, str(run.root), {"default": cfg.source_adapter}, plan.gpu_bytes_after_engines())
    return StageRunner(cfg, engines)


def _run_until(runner: StageRunner, until: str) -> None:
    """The runner's stages from its next one through ``until``; the source engines are released before
    the first stage after them (their devices are the training's)."""
    for name in STAGES[STAGES.index(runner.next_stage): STAGES.index(until) + 1]:
        if name not in SOURCE_STAGES:
            runner.engines.release()
        runner.run_next(name)


def check_plan(cfg: TransplantConfig, resources: Resources) -> Plan:
    """The plan on ``resources``, or a ConfigError with each stage that cannot fit and what would."""
    plan = make_plan(cfg, resources)
    if not plan.fits:
        advice = [f"  try for {s.stage}: {x}" for s in plan.stages for x in s.suggestions]
        raise ConfigError("this config does not fit the cluster (titok plan --config ... shows the whole plan):\n  "
                          + "\n  ".join(plan.problems()) + ("\n" + "\n".join(advice) if advice else ""))
    return plan


def format_summary(result: dict) -> str:
    lines = [f"{'stage':8s} {'status':7s} {'rows':>6s} {'seconds':>8s}"]
    for name, info in result["stages"].items():
        lines.append(f"{name:8s} {info['status']:7s} {str(info.get('rows', '')):>6s} {str(info.get('seconds', '')):>8s}")
    for stage, (dtype, reason) in result.get("dtypes", {}).items():
        lines.append(f"{stage} dtype: {dtype} ({reason})")
    searched = result.get("train", {}).get("lr_search")
    if searched:
        ends, out = result["train"].get("lr_answers_end", {}), result["train"].get("lr_ruled_out", [])
        spreads = result["train"].get("lr_answers_spread", {})
        losses = ", ".join(f"{lr}: {curve[-1]:.4f}{_answers_text(ends.get(lr), spreads.get(lr), lr in out)}" if curve
                           else f"{lr}: diverged" for lr, curve in searched.items())
        lines.append(f"train lr: {result['train']['metrics']['lr']:g}, the lowest validation loss of {losses}")
    lines.append(f"run dir: {result['run_dir']}")
    if "adapter" in result:
        lines.append(f"adapter: {result['adapter']}  (load with peft.PeftModel.from_pretrained)")
    return "\n".join(lines)


def _answers_text(share: float | None, spread: dict | None, ruled_out: bool) -> str:
    """`` (answers end 94%)`` for a rate of an lr_search, ``, 'yes' to 97%: collapsed`` where its answers
    collapse to one, and whether that ruled it out."""
    if share is None:
        return ""
    from titok.core.validation_split import collapsed_answer_text

    one = f", {collapsed_answer_text(spread)}" if spread and spread["collapsed"] else ""
    return f" (answers end {share:.0%}{one}{': ruled out' if ruled_out else ''})"
