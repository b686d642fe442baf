"""The run directory: one folder per stage, a completion marker with a fingerprint, and an event log.

A stage is complete when ``<run_dir>/<stage>/_COMPLETE.json`` exists and its fingerprint (a hash of
the config fields that shaped the stage and of the upstream fingerprint) matches. A rerun of the
same config skips complete stages; a changed field reruns its stage and everything after it, and says
which fields changed (the marker keeps the settings it was made with: a hash alone cannot say why an
hour-long stage is about to run again).

The event log records every model load (stage, node, pid), so a test or a person can see what work
a run really did. On a cluster some 32 processes on several nodes write it on shared storage, where
appends from different nodes are not atomic (NFS), so each process appends to a file of its own
(``events/<host>-<pid>.jsonl``) and ``events()`` merges them by time. A line a dying process left
half-written is skipped with a warning, never fatal: the log is a record, not state.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["ADAPTER_CARD", "ADAPTER_CONFIG", "ADAPTER_FILES", "ADAPTER_WEIGHTS", "COMPLETE", "EVENTS_DIR", "LEGACY_EVENTS",
           "MODEL_CARD", "REPLACED", "RUN_CONFIG", "RUN_LOCK", "RUN_MANIFEST", "STARTED", "RunDir", "RunInUse", "dataset_of",
           "read_events", "run_stage", "settings_change", "write_atomic"]

# The names in a run folder, here and nowhere else (every module that reads or writes one imports them)
RUN_MANIFEST = ".titok-run.json"  # marks a folder as a titok run (titok only clears its own folders)
RUN_CONFIG = "config.yaml"  # the run's full config, as resolved
EVENTS_DIR = "events"  # one event file per writing process
COMPLETE = "_COMPLETE.json"  # a stage's completion marker, written last (fingerprint, outputs digest, summary)
REPLACED = ".replaced"  # suffix of a complete stage set aside while other settings recompute it
STARTED = "_STARTED.json"  # a stage attempt under way (its fingerprint: what a resubmission may go on from)
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's own names
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
ADAPTER_CARD = "titok.json"  # how titok made an adapter (titok.export)
MODEL_CARD = "README.md"  # an exported adapter's model card (the Hub shows it)
LEGACY_EVENTS = "events.jsonl"  # runs from before per-process files


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_MARKERS = (COMPLETE, STARTED)
_NOT_OUTPUTS = ("ray",)  # Ray Train's checkpoints: resumable state, not the stage's product


def _outputs_digest(folder: Path) -> str:
    """Digest of a stage's output files (names and contents), markers and checkpoints aside."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if relative.name in _MARKERS or relative.parts[0] in _NOT_OUTPUTS or relative.name.startswith("."):
            continue
        with open(path, "rb") as f:
            contents = hashlib.file_digest(f, "sha256").hexdigest()
        digest.update(f"{relative}:{contents};".encode())
    return digest.hexdigest()[:16]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


RUN_LOCK = ".titok.lock"


# The locks this process holds. filelock frees a lock when its object is collected, and compare, zoo
# and transplant each claim through a RunDir they drop at once: held here, a claim lasts until the
# process ends (then the kernel frees it, however the process ends).
_HELD: dict[Path, Any] = {}


_EXITING_HOLDER_S = 60.0  # how long a claim waits for an exiting holder's kernel to free its lock


def _exiting(pid) -> bool:
    """Whether process ``pid`` of this host is gone or ending: a zombie, or flagged as exiting
    (``PF_EXITING``) while the kernel frees a large process's memory, which comes before its files and
    so its lock: a job resubmitted right after ``kill -9`` of the last one waits for that, not refused."""
    try:
        fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError, ValueError):
        return True
    return fields[0] in "ZXx" or bool(int(fields[6]) & 0x4)


class RunInUse(RuntimeError):
    """Another titok process holds this run directory."""


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def claim(self) -> None:
        """Hold the folder for this process's life, one run at a time, and mark it as a titok run (titok
        only ever clears stage folders of its own runs).

        The lock is ``filelock``'s (``flock`` on the lock file): the kernel drops it when its process
        ends, however it ends, so a run killed with ``kill -9`` leaves no stale lock; the holder's host,
        pid and start time sit beside it for the message a second run gets. On NFS, Linux takes
        ``flock`` as an NFS lock (v4: held under the client's lease, freed about 90 s after a client
        dies), so two nodes on one run dir exclude each other too."""
        from filelock import FileLock, Timeout

        holder_file = self.root / f"{RUN_LOCK}.json"
        lock = FileLock(str(self.root / RUN_LOCK), is_singleton=True)  # one lock object per path in a process
        if not lock.is_locked:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                holder = _read_json(holder_file)
                in_use = RunInUse(
                    f"{self.root} is in use by another titok run (host {holder.get('host', '?')}, pid "
                    f"{holder.get('pid', '?')}, since {holder.get('started', '?')}); a run dir holds one run at "
                    "a time: wait for it, stop it, or give another run_dir")
                if holder.get("host") != socket.gethostname() or not _exiting(holder.get("pid")):
                    raise in_use from None
                try:  # a holder of this host that is exiting (killed, its memory being freed) lets go soon
                    lock.acquire(timeout=_EXITING_HOLDER_S)
                except Timeout:
                    raise in_use from None
            previous = _read_json(holder_file)
            if previous and previous.get("pid") != os.getpid():
                print(f"warning: {self.root} was held by a titok run that ended without letting go (host "
                      f"{previous.get('host')}, pid {previous.get('pid')}, since {previous.get('started')}); "
                      "taking it over", file=sys.stderr, flush=True)
            write_atomic(holder_file, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}))
            _HELD[self.root] = lock  # held for the process's life: callers drop their RunDir at once
            import atexit

            atexit.register(holder_file.unlink, missing_ok=True)
        manifest = self.root / RUN_MANIFEST
        if not manifest.is_file():
            write_atomic(manifest, json.dumps({"tool": "titok", "created": time.time()}))

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    @staticmethod
    def fingerprint(upstream: str, fields: Any) -> str:
        blob = json.dumps({"upstream": upstream, "fields": fields}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def is_complete(self, stage: str, fingerprint: str) -> bool:
        """Complete with this fingerprint, and its outputs are the ones the marker recorded. A torn
        marker or outputs changed since (a truncated Parquet, a deleted adapter) are recomputed,
        with a warning, never trusted."""
        marker = self.stage_dir(stage) / COMPLETE
        if not marker.is_file():
            return False
        record = _read_json(marker)
        if not record:
            return self._recompute(stage, f"its completion marker {marker} is unreadable")
        if record.get("fingerprint") != fingerprint:
            return False  # the config changed: a different stage, not a damaged one
        if "outputs" in record and _outputs_digest(self.stage_dir(stage)) != record["outputs"]:
            return self._recompute(stage, "its outputs changed since it completed (torn, edited or deleted files)")
        return True

    def _recompute(self, stage: str, reason: str) -> bool:
        print(f"warning: [{stage}] {reason}; recomputing it", file=sys.stderr, flush=True)
        self.log_event(event="stage_recomputed", stage=stage, reason=reason)
        return False

    def start(self, stage: str, fingerprint: str = "", resumable: tuple[str, ...] = ()) -> Path:
        """The folder of a stage that (re)runs. What an interrupted attempt left is dropped, except the
        ``resumable`` entries of an attempt with the same fingerprint (training checkpoints: a killed
        job, resubmitted, goes on from its last checkpoint instead of from step 0)."""
        path = self.stage_dir(stage)
        started = path / STARTED
        same = started.is_file() and _read_json(started).get("fingerprint") == fingerprint
        if path.is_dir():
            for entry in path.iterdir():
                if not (same and entry.name in resumable):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        path.mkdir(parents=True, exist_ok=True)
        write_atomic(started, json.dumps({"fingerprint": fingerprint, "started": time.time()}))
        return path

    def _aside(self, stage: str) -> Path:
        path = self.stage_dir(stage)
        return path.with_name(path.name + REPLACED)

    def set_aside(self, stage: str) -> Path:
        """Move a complete stage of other settings out of the way of its recomputation (a rename, not a
        copy): a rerun stopped before it finishes, or settings put back, get it back (``restore``)."""
        aside = self._aside(stage)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(self.stage_dir(stage), aside)
        return aside

    def restore(self, stage: str, fingerprint: str) -> bool:
        """Put back the stage set aside, if it completed with ``fingerprint`` (``is_complete`` then checks
        its outputs as any complete stage's); what a stopped recomputation left goes."""
        aside = self._aside(stage)
        if not (aside / COMPLETE).is_file() or _read_json(aside / COMPLETE).get("fingerprint") != fingerprint:
            return False
        shutil.rmtree(self.stage_dir(stage), ignore_errors=True)
        os.replace(aside, self.stage_dir(stage))
        return True

    def drop_set_aside(self, stage: str) -> None:
        shutil.rmtree(self._aside(stage), ignore_errors=True)

    def completed_record(self, stage: str) -> dict:
        """The completion marker of ``stage`` as written (any fingerprint; empty when there is none)."""
        marker = self.stage_dir(stage) / COMPLETE
        return _read_json(marker) if marker.is_file() else {}

    def complete(self, stage: str, fingerprint: str, **summary: Any) -> None:
        """Write the completion marker last, with a digest of the stage's outputs (checked on reuse)."""
        record = {"fingerprint": fingerprint, "finished": time.time(),
                  "outputs": _outputs_digest(self.stage_dir(stage)), **summary}
        write_atomic(self.stage_dir(stage) / COMPLETE, json.dumps(record, indent=2, default=str))

    def summary(self, stage: str) -> dict:
        """What a complete stage recorded of itself (rows, seconds, metrics), less the settings it was
        made with (kept only to say what changed when it runs again)."""
        record = json.loads((self.stage_dir(stage) / COMPLETE).read_text())
        record.pop("settings", None)
        return record

    def log_event(self, **event: Any) -> None:
        """Append one JSON line to this process's own event file (one writer per file, one write per line)."""
        event = {"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), **event}
        folder = self.root / EVENTS_DIR
        folder.mkdir(exist_ok=True)
        line = (json.dumps(event, default=str) + "\n").encode()
        with open(folder / f"{event['host']}-{event['pid']}.jsonl", "a+b") as f:
            if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                line = b"\n" + line  # an earlier process with this host and pid died mid-line: end its line
            f.write(line)

    def events(self) -> list[dict]:
        """Every process's events, merged in time order (torn lines skipped with a warning)."""
        return read_events(self.root)


def read_events(root: str | Path) -> list[dict]:
    """The events under run folder ``root``, merged by time; a line that does not parse (a writer
    died mid-line) is skipped and named in a warning."""
    root = Path(root)
    files = sorted((root / EVENTS_DIR).glob("*.jsonl")) + [p for p in [root / LEGACY_EVENTS] if p.is_file()]
    events = []
    for path in files:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError as err:
            print(f"warning: could not read event file {path} ({err}); skipping it", file=sys.stderr, flush=True)
            continue
        torn = 0
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                torn += 1
                continue
            if isinstance(event, dict):
                events.append(event)
            else:
                torn += 1
        if torn:
            print(f"warning: skipped {torn} unreadable line(s) in {path} (a process that died mid-write?)",
                  file=sys.stderr, flush=True)
    return sorted(events, key=lambda e: e.get("time", 0.0) if isinstance(e.get("time"), (int, float)) else 0.0)


def _flat(fields: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(fields, dict) and fields:
        return {k: v for key, value in fields.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): json.dumps(fields, sort_keys=True, default=str)}


def settings_change(before: dict | None, now: dict, shown: int = 4) -> str:
    """Why a stage completed with other settings runs again, in words: the fields that differ
    (``train.lr 0.001 -> 0.003``), or an upstream stage that did. ``before``/``now``: ``{"upstream":
    fingerprint, "fields": {...}}``; ``before`` is None for a marker from a titok that kept no settings."""
    if not before or "fields" not in before:
        return "its settings changed (the run that completed it kept no record of which)"
    old, new = _flat(before["fields"]), _flat(now["fields"])
    changes = [f"{key} {old[key]} -> {new[key]}" for key in new if key in old and old[key] != new[key]]
    changes += [f"{key} added ({new[key]})" for key in new if key not in old]
    changes += [f"{key} removed (was {old[key]})" for key in old if key not in new]
    if not changes:
        return "an earlier stage's output it was made from changed" if before.get("upstream") != now["upstream"] \
            else "its settings changed"
    more = f"; and {len(changes) - shown} more" if len(changes) > shown else ""
    return "changed since it completed: " + "; ".join(changes[:shown]) + more


def run_stage(run: RunDir, name: str, fingerprint: str, compute, timings: dict, resumable: tuple[str, ...] = (),
              settings: dict | None = None):
    """Reuse a complete stage, or compute it and mark it complete; returns the stage's rows (Arrow).
    ``settings`` (``{"upstream": fingerprint, "fields": {...}}``, what ``fingerprint`` hashes) go into
    the marker, so a later run with other settings can say what changed.

    ``compute`` returns an Arrow table or a Ray Dataset (persisted as Parquet), or a dict of summary
    fields (a stage that writes its own files, like train; ``resumable`` names what of an interrupted
    attempt it can go on from). Rows are read back on the driver: stage
    data is small (text and per-token arrays), and while the source engines hold every core of a
    small node a Ray read task would wait forever.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = run.stage_dir(name)
    complete = run.is_complete(name, fingerprint)  # hashes the stage's outputs: once on the common path
    if not complete and run.restore(name, fingerprint):
        print(f"[{name}] put back the output these settings made, set aside by a rerun with other settings",
              file=sys.stderr, flush=True)
        complete = run.is_complete(name, fingerprint)
    if complete:
        timings[name] = {"status": "cached", **run.summary(name)}
        print(f"[{name}] complete in {out}, reusing it", flush=True)
    else:
        from titok import progress

        before = run.completed_record(name)
        if before and settings is not None and before.get("fingerprint") != fingerprint:  # not a damaged one
            why = settings_change(before.get("settings"), settings)
            aside = run.set_aside(name)  # kept until the new output is complete: a stop loses nothing
            print(f"[{name}] recomputing it: {why} (the old output waits in {aside} until this one completes)",
                  file=sys.stderr, flush=True)
            run.log_event(event="stage_settings_changed", stage=name, change=why, set_aside=str(aside))
        started = time.perf_counter()
        with progress.stage(name) as bar:  # the stage's one line; its work feeds it (progress.current())
            run.start(name, fingerprint, resumable=resumable)
            produced = compute()
            summary = produced if isinstance(produced, dict) else {}
            if isinstance(produced, pa.Table):
                pq.write_table(produced, out / "rows.parquet")
            elif not isinstance(produced, dict):
                produced.write_parquet(str(out), ray_remote_args={"num_cpus": 0})
            if not isinstance(produced, dict):
                summary = {"rows": pq.read_table(str(out), columns=[]).num_rows}
            if not bar.counted and summary.get("rows") is not None:
                bar.add_note(f"{summary['rows']} rows")
        run.complete(name, fingerprint, seconds=round(time.perf_counter() - started, 1), **summary,
                     **({"settings": settings} if settings is not None else {}))
        run.drop_set_aside(name)
        timings[name] = {"status": "ran", **run.summary(name)}
    if not any(out.glob("*.parquet")):
        return None
    return pq.read_table(str(out))


def dataset_of(rows, block_rows: int):
    """A Ray Dataset of an Arrow table in blocks of ``block_rows``, made on the driver (no read task)."""
    import ray

    return ray.data.from_arrow([rows.slice(i, block_rows) for i in range(0, max(rows.num_rows, 1), block_rows)])
