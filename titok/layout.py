"""Where things live under a run directory, a compare folder or a zoo folder, in one place.

compare, report and migrate all name folders after models, tasks and adapters, and share the source
stages (queries, labels, scores) between run directories by copying them: both are decided here.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

__all__ = ["SOURCE_STAGES", "adapter_digest", "file_digest", "share_stages", "short_name"]

# the stages that depend only on the source side (base, adapter, task, seed): shareable between runs
SOURCE_STAGES = ("queries", "labels", "scores")


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
    return None if path is None else file_digest(Path(path) / "adapter_model.safetensors")


def share_stages(source_run: Path, run_dir: Path, stages: tuple[str, ...] = SOURCE_STAGES) -> None:
    """Copy complete stages of one run directory into another that lacks them. The copy keeps its
    completion marker; the pipeline reuses it only where the fingerprints match, so sharing is safe
    whenever the two runs' settings for those stages agree (and harmless where they do not)."""
    for stage in stages:
        if (source_run / stage / "_COMPLETE.json").is_file() and not (run_dir / stage / "_COMPLETE.json").is_file():
            shutil.rmtree(run_dir / stage, ignore_errors=True)
            shutil.copytree(source_run / stage, run_dir / stage)
    progress = source_run / "queries.progress.json"
    if "queries" in stages and progress.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(progress, run_dir / progress.name)
