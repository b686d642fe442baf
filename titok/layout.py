"""Where things live under a run directory, a compare folder or a zoo folder, in one place.

compare, report and migrate all name folders after models, tasks and adapters, and share the source
stages (queries, labels, scores) between run directories by copying them: both are decided here, as
is each compare cell's run (its config and folder, its training budget, its row in the tables), so
that ``titok.workflows.report`` reads a compare folder without importing ``titok.workflows.compare``.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from titok.choices import PAPER_METHOD
from titok.runstate import ADAPTER_WEIGHTS, COMPLETE

if TYPE_CHECKING:
    from titok.config import CompareConfig, TransplantConfig

__all__ = ["BUDGETS", "SOURCE_STAGES", "adapter_digest", "budgets", "equal_steps", "file_digest", "row_label", "row_method", "run_config",
           "share_stages", "short_name", "stage_path"]

# the stages that depend only on the source side (base, adapter, task, seed): shareable between runs
SOURCE_STAGES = ("queries", "labels", "scores")
# a compare's training budgets: train.epochs for every method, or the same optimizer steps for every method
BUDGETS = ("epochs", "steps")


def stage_path(method: str, stage: str) -> str:
    """Where a stage's output lives in a run dir for ``method`` (``filter.variant``). Baselines and
    ablations share queries, labels and scores with TiTok and keep their own filter/align/train/adapter
    under ``<method>/``, so trying every method in one run dir loses nothing."""
    if method == PAPER_METHOD or stage in SOURCE_STAGES:
        return stage
    return f"{method.replace(':', '-')}/{stage}"


def short_name(spec: str) -> str:
    """A model or task spec as a folder name, unique by construction: a plain name as it is
    (``gemma3-270m``), a path or hub id as its last part plus a hash of the whole spec
    (``task-3f2a9c`` for ``a/task.json``, another for ``b/task.json``)."""
    if "/" not in spec and "." not in spec and ":" not in spec:
        return re.sub(r"[^A-Za-z0-9_-]+", "_", spec)
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec.rstrip("/").split(":")[-1]).stem or "spec")
    return f"{readable}-{hashlib.sha256(spec.encode()).hexdigest()[:6]}"


def file_digest(path: str | Path, length: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def adapter_digest(path: str | Path | None) -> str | None:
    """Content digest of a PEFT folder's weights (what an evaluation or a provenance record keys on)."""
    return None if path is None else file_digest(Path(path) / ADAPTER_WEIGHTS)


def share_stages(source_run: Path, run_dir: Path, stages: tuple[str, ...] = SOURCE_STAGES) -> None:
    """Copy complete stages of one run directory into another that lacks them. The copy keeps its
    completion marker; the pipeline reuses it only where the fingerprints match, so sharing is safe
    whenever the two runs' settings for those stages agree (and harmless where they do not)."""
    for stage in stages:
        if (source_run / stage / COMPLETE).is_file() and not (run_dir / stage / COMPLETE).is_file():
            shutil.rmtree(run_dir / stage, ignore_errors=True)
            shutil.copytree(source_run / stage, run_dir / stage)
    progress = source_run / "queries.progress.json"
    if "queries" in stages and progress.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(progress, run_dir / progress.name)


def budgets(cfg: CompareConfig) -> tuple[str, ...]:
    """The budgets a compare trains every method under."""
    return BUDGETS if cfg.budget == "both" else (cfg.budget,)


def run_config(cfg: CompareConfig, task: str, seed: int, target: str, variant: str, source_adapter: str,
               budget: str = "epochs") -> TransplantConfig:
    """One compare cell's transplant config and run folder; ``variant`` is ``method`` or ``method:reference``."""
    from titok.choices import FILTER_METHODS
    from titok.config import TransplantConfig, validated

    method, _, reference = variant.partition(":")
    # a method on the whole pool already trains kd's steps in train.epochs: under the steps budget its
    # run is its epochs run (the same fingerprint and folder, so neither a switch of budget nor
    # budget: both trains or evaluates it twice)
    own_steps = budget == "steps" and bool(cfg.steps or FILTER_METHODS[method].keeps_m)
    folder = short_name(target) + ("-steps" if own_steps and cfg.budget == "both" else "")
    fields = {**cfg.task_settings(task), "source_base": cfg.source_base, "source_adapter": source_adapter,
              "target_base": target, "task": task, "seed": seed, "split_seed": cfg.split_seed,
              "run_dir": str(Path(cfg.out_dir) / "runs" / short_name(task) / f"seed{seed}" / folder)}
    fields["filter"] = {**fields.get("filter", {}), "method": method, "reference": reference or "source_amateur"}
    what = f"compare (task {task}, target {target}, method {variant}, budget {budget})"
    cfg_run = validated(TransplantConfig, fields, what)
    if own_steps:
        fields["train"] = {**fields.get("train", {}), "max_steps": cfg.steps or equal_steps(cfg_run)}
        cfg_run = validated(TransplantConfig, fields, what)
    return cfg_run


def equal_steps(run: TransplantConfig) -> int:
    """The optimizer steps kd takes in train.epochs epochs: every sample of the pool but those it holds
    out for validation (``train.validation_fraction``), so a method on fewer samples trains as long."""
    from titok.train.batching import train_plan

    return train_plan(run.pool_size, run.train.model_copy(update={"max_steps": None}), run.train.workers).total_steps


def row_label(cfg: CompareConfig, variant: str, budget: str) -> str:
    """A trained row's name in the tables: the variant, and its budget when both budgets are compared."""
    return f"{variant} ({budget})" if cfg.budget == "both" else variant


def row_method(label: str) -> str:
    """The filter method a row's name trains with: ``titok`` for ``titok``, ``titok:target_base`` and
    ``titok (steps)`` alike (what the report pairs TiTok's rows by)."""
    return label.split(" (")[0].partition(":")[0]
