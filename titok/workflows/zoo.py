"""``titok migrate``: move a whole adapter zoo from one base model to another in one job.

    titok migrate --config configs/zoo-demo.yaml

A zoo is the transplant's own stages looped over adapters, each adapter in its own run directory
(``out_dir/runs/<name>``, exactly what a lone ``titok transplant`` would leave), with the costly
work shared:
- the source base is loaded once per engine actor with every adapter (``SourceEngines``) and serves
  all adapters' queries, labels and scores; each pass serves one adapter, so a batch never mixes them;
- queries are written once per task (and query settings) and copied to the other adapters of it;
- one Ray Data pass filters every adapter's scored pool (``groupby`` on the adapter, each pool whole
  on one worker) and streams the kept rows into one alignment pass to the target tokenizer;
- the trainings share worker groups: each group starts its Ray Train workers and loads the target
  once, then trains its adapters one after another (``pipeline.train_together``);
  ``concurrent_trainings`` groups run side by side.
One adapter's failure (unreadable weights, no surviving queries, a non-finite loss) marks its row
failed with the reason; the others finish (a shared pass that fails falls back to each adapter's own
stage, where the failure stays that adapter's). A rerun reuses every finished stage, so a finished
adapter costs nothing again. Then each adapter goes through the release gate (``zoo_report``), and
the zoo folder gets the migrated adapters with provenance, ``zoo.json``, ``summary.md``/``.csv``
and a vLLM serving file.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from titok.config import (ConfigError, EvalSettings, OutputPath, Section, TransplantConfig, TransplantSettings,
                          merged_fields, read_yaml, validated)
from titok import signals
from titok.layout import share_stages
from titok.validate import check_model, check_task

__all__ = ["GateSettings", "ZooAdapter", "ZooManifest", "load_manifest", "migrate", "validate_manifest"]

_PER_ADAPTER_FIELDS = ("source_base", "source_adapter", "target_base", "task", "run_dir")
_SHARED_SECTIONS = ("engine", "trust_remote_code")  # one engine fleet serves every adapter
_ADAPTER = "_zoo_adapter"  # which adapter a row of a shared pass belongs to
_ORDER = "_zoo_order"  # a kept row's place in its adapter's filter output


class ZooAdapter(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="unique; names the output folder")
    path: str = Field(..., description="the source PEFT adapter folder (trained on source_base)")
    task: str = Field(..., description="built-in task name, BBH/BIG-bench/MMLU/LaMP file, or hf:ID[:CONFIG]")
    overrides: TransplantSettings = Field(
        default_factory=TransplantSettings, description="transplant fields for this adapter only (filter, train, labels, "
        "queries, seed); they override defaults")

    @field_validator("overrides", mode="before")
    @classmethod
    def _not_shared(cls, values):
        clashes = [k for k in values if k in _PER_ADAPTER_FIELDS + _SHARED_SECTIONS] if isinstance(values, dict) else []
        if clashes:
            raise ValueError(f"{clashes} cannot differ between adapters (set them at the top of the manifest or in defaults)")
        return values


class GateSettings(EvalSettings):
    """Release gate: evaluation of expert, vanilla target and migrated target on held-out examples."""

    enabled: bool = Field(True, description="evaluate and gate every migrated adapter")
    min_retained: float = Field(
        0.5, ge=0.0, description="pass when (migrated - vanilla) >= min_retained x (expert - vanilla) on the task's "
        "metric (exact match; ROUGE-L for free-text tasks), and the expert beats vanilla at all")


class ServingSettings(Section):
    """How ``serve.yaml`` (``vllm serve --config``) serves the migrated zoo."""

    max_loras: int = Field(4, ge=1, description="adapters in one batch: each is a GPU slot of max-lora-rank; requests "
                           "for more adapters at once wait (every adapter stays in host memory: max-cpu-loras = the zoo)")


class ZooManifest(Section):
    source_base: str = Field(..., description="the base every source adapter was trained on")
    target_base: str = Field(..., description="the base to move them to")
    out_dir: OutputPath = Field("runs/zoo", validate_default=True,
                                description="run directories, migrated adapters and summaries go here")
    defaults: TransplantSettings = Field(
        default_factory=TransplantSettings, description="transplant fields shared by every adapter (engine, queries, "
        "labels, filter, train, seed, split_seed, trust_remote_code)")
    adapters: list[ZooAdapter] = Field(..., min_length=1, description="the zoo")
    concurrent_trainings: int = Field(
        1, ge=1, description="training worker groups running at once on the cluster; the adapters are spread over "
        "them, and each group loads the target once for all of its adapters")
    gate: GateSettings = Field(default_factory=GateSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)

    @field_validator("defaults", mode="before")
    @classmethod
    def _no_per_adapter_fields(cls, values):
        clashes = [k for k in values if k in _PER_ADAPTER_FIELDS] if isinstance(values, dict) else []
        if clashes:
            raise ValueError(f"{clashes} are set per adapter by the manifest")
        return values

    @model_validator(mode="after")
    def _unique_names(self) -> "ZooManifest":
        names = [a.name for a in self.adapters]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"adapter names listed twice: {twice}")
        # each name is a folder under out_dir: Bool and bool are one folder on macOS's and Windows' file systems
        folded = [n.casefold() for n in names]
        clashing = sorted({n for n in names if folded.count(n.casefold()) > 1})
        if clashing:
            raise ValueError(f"adapter names {clashing} differ only in case: one folder on a case-insensitive file "
                             "system; rename one")
        return self


def load_manifest(path: str | None, overrides: list[str] = ()) -> ZooManifest:
    return validated(ZooManifest, read_yaml(path, overrides), "zoo manifest")


def adapter_config(manifest: ZooManifest, adapter: ZooAdapter) -> TransplantConfig:
    fields = merged_fields(manifest.defaults.fields(), adapter.overrides.fields())
    fields.update(source_base=manifest.source_base, target_base=manifest.target_base, source_adapter=adapter.path,
                  task=adapter.task, run_dir=str(Path(manifest.out_dir) / "runs" / adapter.name))
    return validated(TransplantConfig, fields, f"adapter {adapter.name!r}")


def validate_manifest(manifest: ZooManifest) -> tuple[dict[str, TransplantConfig], dict[str, str]]:
    """Every adapter's config, and the adapters whose weights cannot be used (isolated: reason per name).

    Raises one ConfigError listing every problem of the manifest itself: configs that do not
    validate, adapters that are missing, trained on another base or aimed at projections the base
    lacks, tasks that do not load, models that do not resolve. Nothing has loaded a model yet.
    """
    from titok.models import resolve_model_path
    from titok.validate import adapter_config_problems, adapter_weight_problems

    from titok.validate import gpu_problems, run_dir_problems

    problems, configs, unusable = run_dir_problems("out_dir", manifest.out_dir), {}, {}
    for field, spec in (("source_base", manifest.source_base), ("target_base", manifest.target_base)):
        try:
            check_model(field, spec)
        except ConfigError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("zoo manifest:\n  " + "\n  ".join(problems))
    source_path = resolve_model_path(manifest.source_base)
    tasks: dict[str, str | None] = {}
    for adapter in manifest.adapters:
        field = f"adapters[{adapter.name}]"
        try:
            cfg = configs[adapter.name] = adapter_config(manifest, adapter)
        except ConfigError as err:
            problems.append(f"{field}: {err}")
            continue
        found = adapter_config_problems(f"{field}.path", adapter.path, manifest.source_base, source_path, cfg.trust_remote_code)
        problems += found
        if not found:
            weights = adapter_weight_problems(f"{field}.path", adapter.path, manifest.source_base, cfg.trust_remote_code)
            if weights:
                unusable[adapter.name] = weights[0]
        if adapter.task not in tasks:
            try:
                task = check_task(f"{field}.task", adapter.task, cfg.split_seed)
                tasks[adapter.task] = None if len(task.seed_examples) >= cfg.queries.few_shot else \
                    f"{field}.task: {adapter.task!r} has {len(task.seed_examples)} seed examples, queries.few_shot is {cfg.queries.few_shot}"
            except ConfigError as err:
                tasks[adapter.task] = str(err)
        if tasks[adapter.task]:
            problems.append(tasks[adapter.task])
    if configs:
        problems += [f"defaults.{problem}" for problem in gpu_problems(next(iter(configs.values())))]
    if problems:
        raise ConfigError("zoo manifest (nothing was run):\n  " + "\n  ".join(dict.fromkeys(problems)))
    return configs, unusable


def _failure(err: BaseException) -> str:
    """One line: the exception's own message (Ray wraps worker errors around it)."""
    cause = err
    while getattr(cause, "cause", None) is not None or cause.__cause__ is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


def migrate(manifest: ZooManifest) -> dict:
    """Migrate every adapter (resuming what is done); returns the zoo record written to ``zoo.json``."""
    from titok.workflows.pipeline import SourceEngines, StageRunner, check_plan, train_together
    from titok.workflows.plan import cluster_resources
    from titok.progress import init_ray
    from titok.readiness import wait_for_resources
    from titok.runstate import RunDir
    from titok.workflows.zoo_report import gate_and_write

    configs, unusable = validate_manifest(manifest)
    init_ray()
    distinct = list({json.dumps(c.model_dump(exclude={"source_adapter", "run_dir", "task"}), sort_keys=True): c
                     for c in configs.values()}.values())
    wait_for_resources(distinct)  # on a cluster, GPU nodes may still be registering
    resources = cluster_resources()
    plans = [check_plan(cfg, resources) for cfg in distinct]  # before any model loads
    free_gpu_bytes = max((plan.gpu_bytes_after_engines() for plan in plans), default=0)
    out = Path(manifest.out_dir)  # resolved by the manifest (OutputPath)
    RunDir(out).claim()  # the zoo's own folder; its event log gets the engine loads
    started, started_at = time.perf_counter(), time.time()
    rows = {a.name: {"name": a.name, "task": a.task, "source_adapter": a.path, "status": "pending", "reason": ""}
            for a in manifest.adapters}
    for name, reason in unusable.items():
        rows[name].update(status="failed", reason=reason, stage="validate")
    live = [a for a in manifest.adapters if a.name not in unusable]
    engines = SourceEngines(configs[live[0].name], str(out), {a.name: a.path for a in live},
                            free_gpu_bytes) if live else None
    runners = {a.name: StageRunner(configs[a.name], engines, adapter=a.name) for a in live}
    by_task = sorted(runners, key=lambda n: rows[n]["task"])

    def step(stage: str, at_once: int = 1) -> None:
        signals.thread_map(lambda name: _attempt(rows[name], runners[name], stage), _alive(rows, by_task), at_once)

    try:
        for name in by_task:  # queries once per task: copy a finished sibling's before writing any
            _share_queries(runners, name, by_task)
            _attempt(rows[name], runners[name], "queries")
        step("labels")
        step("scores")
    finally:
        if engines is not None:
            engines.close()  # on an error too: the engines never outlive the scoring
    if engines is not None:
        engines.release()  # closed already: waits until their GPUs are free for the training groups
    _filter_and_align_together(runners, _alive(rows, by_task), out)
    step("filter", at_once=len(runners))  # what the shared pass did not provide: small distributed jobs, side by side
    _align_together(runners, _alive(rows, by_task), out)
    step("align")  # each adapter's align stage takes its rows from the shared pass
    train_together(runners, _alive(rows, by_task), manifest.concurrent_trainings, out / "trainings")
    step("train")  # each adapter's train stage takes its outcome from its group
    shutil.rmtree(out / "trainings", ignore_errors=True)  # the groups' checkpoints: every outcome is taken
    step("export")
    for name, runner in runners.items():
        rows[name]["stages"] = {stage: info.get("status") for stage, info in runner.timings.items()}
        rows[name]["stage_seconds"] = {stage: info.get("seconds") for stage, info in runner.timings.items()
                                       if info.get("status") == "ran"}  # this job's compute, not an earlier one's
    shared = [{k: e[k] for k in ("stage", "adapters", "seconds")} for e in RunDir(out).events()
              if e.get("event") == "shared_pass" and e["time"] >= started_at]  # work no one adapter's row holds
    return gate_and_write(manifest, configs, rows, runners, out, time.perf_counter() - started, shared)


def _alive(rows: dict, names: list[str]) -> list[str]:
    return [n for n in names if rows[n]["status"] != "failed"]


def _attempt(row: dict, runner, stage: str) -> None:
    """Run one stage of one adapter; a failure is that adapter's alone."""
    try:
        runner.run_next(stage)
        row["status"] = "migrated" if stage == "export" else "running"
    except Exception as err:  # noqa: BLE001 - isolation: any error of one adapter must not stop the zoo
        row.update(status="failed", stage=stage, reason=_failure(err))
        print(f"[migrate] {row['name']}: {stage} failed: {row['reason']}", flush=True)
        runner.run.log_event(event="adapter_failed", stage=stage, reason=row["reason"], trace=traceback.format_exc()[-2000:])


def _filter_and_align_together(runners: dict, names: list[str], out: Path) -> None:
    """One Ray Data pass filters every adapter's scored pool (``groupby`` on the adapter, each pool on
    one worker by ``filter_pool``, equal to the lone transplant's distributed filter) and streams the
    kept rows into one alignment pass, per set of align settings. Adapters whose filter method has no
    one-pool form, or whose filter stage is complete, are left to their own stages."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    from titok import columns as C
    from titok.choices import FILTER_METHODS

    eligible = [n for n in names if runners[n].rows is not None and not runners[n].is_complete("filter")
                and FILTER_METHODS[runners[n].cfg.filter.method].one_pool]
    for group in _align_groups(runners, eligible):
        scored = pa.concat_tables([_numbered(runners[n].rows, n) for n in group], promote_options="default")
        settings = {n: runners[n].cfg.filter.model_dump(include={"method", "top_m", "k", "token_scope", "group_size"})
                    for n in group}
        kept = ray.data.from_arrow(scored).groupby(_ADAPTER).map_groups(
            _filter_one_pool, fn_kwargs={"settings": settings}, batch_format="numpy")
        aligned = _aligned_together("filter+align", group, runners, kept, scored.num_rows, out)
        for name in group if aligned is not None else ():
            mine = aligned.filter(pc.equal(aligned[_ADAPTER], name))
            mine = mine.take(pc.sort_indices(mine[_ORDER])).drop_columns([_ADAPTER, _ORDER])  # the filter's order
            runners[name].provide(filter=mine.select(runners[name].rows.column_names + [C.KEEP]), align=mine)


def _numbered(rows, name: str):
    """A run's rows, marked with its adapter for a shared pass."""
    import pyarrow as pa

    return rows.append_column(_ADAPTER, pa.array([name] * rows.num_rows))


def _filter_one_pool(pool: dict, settings: dict) -> dict:
    """``map_groups``: one adapter's whole scored pool through its own filter settings."""
    import numpy as np

    from titok.stages.arrow import table
    from titok.stages.filtering import filter_pool

    f = settings[str(pool[_ADAPTER][0])]
    kept = filter_pool(pool, f["method"], f["top_m"], f["k"], f["token_scope"], f["group_size"])
    return table({**kept, _ORDER: np.arange(len(kept[_ADAPTER]))})


def _align_together(runners: dict, names: list[str], out: Path) -> None:
    """One alignment pass (one tokenizer actor, or one target model for a target-aware reference) over
    the kept rows of every adapter whose align stage is neither complete nor made by the shared
    filter pass, per set of align settings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    eligible = [n for n in names if runners[n].rows is not None and not runners[n].has_provided("align")
                and not runners[n].is_complete("align")]
    for group in _align_groups(runners, eligible):
        kept = pa.concat_tables([_numbered(runners[n].rows, n) for n in group], promote_options="default")
        aligned = _aligned_together("align", group, runners, kept, kept.num_rows, out)
        for name in group if aligned is not None else ():
            runners[name].provide(align=aligned.filter(pc.equal(aligned[_ADAPTER], name)).drop_columns([_ADAPTER]))


def _align_groups(runners: dict, names: list[str]) -> list[list[str]]:
    """Adapters that can share an alignment pass (same align settings), two or more to a group; a lone
    one runs its own stage as in a transplant."""
    from titok.workflows.pipeline import align_settings

    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(json.dumps(align_settings(runners[name].cfg), sort_keys=True), []).append(name)
    return [group for group in groups.values() if len(group) > 1]


def _aligned_together(stage: str, group: list[str], runners: dict, kept, n_rows: int, out: Path):
    """``kept`` (every adapter's rows: a table, or a dataset still being computed) through one alignment
    pass, logged as a shared pass; None if it fails (each adapter then runs its own stages, and fails or
    not alone)."""
    import pyarrow as pa
    import ray

    from titok.workflows.pipeline import align_to_target
    from titok.runstate import RunDir

    started = time.perf_counter()
    try:
        aligned = pa.concat_tables(ray.get(align_to_target(runners[group[0]].cfg, kept, str(out)).to_arrow_refs()),
                                   promote_options="default")
    except Exception as err:  # noqa: BLE001 - the shared pass is an optimisation: its failure is no adapter's
        print(f"[migrate] {stage} for {group} together failed ({_failure(err)}); each adapter runs its own", flush=True)
        return None
    RunDir(out).log_event(event="shared_pass", stage=stage, adapters=group, rows=n_rows,
                          seconds=round(time.perf_counter() - started, 1))
    return aligned


def _share_queries(runners: dict, name: str, order: list[str]) -> None:
    """Copy the queries stage of an adapter with the same task and query settings, if one has it."""
    wanted = runners[name].fingerprint_of("queries")
    for other in order:
        if other != name and runners[other].fingerprint_of("queries") == wanted and \
                runners[other].run.is_complete("queries", wanted):
            share_stages(runners[other].run.root, runners[name].run.root, ("queries",))
            return

