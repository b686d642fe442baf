"""Progress a person can read: one line per stage, on the driver, fed by the actors doing the work.

``stage(name)`` wraps a stage; inside it, ``current()`` is its bar (tqdm): work that knows its size
sets ``total`` and calls ``update`` as batches come back from the engines, and training workers push
``(step, total, loss)`` through a ``Feed`` actor that the driver drains. On a terminal the bar
redraws in place; in a log (``ray job logs``, CI, a file) it writes a line at most every 30 s, so a
stage shorter than that leaves exactly one line, its last state. Written by hand because tqdm draws
bars but knows nothing of Ray: Ray's own progress output is per Ray Data dataset (a line per tiny
dataset, 109 of them in one demo) and per worker, not per titok stage.

``quiet_ray()`` keeps Ray's known-harmless output off the screen (worker stdout, Ray Data's
per-dataset lines and INFO logs, the local-token notice); ``--verbose`` (``TITOK_VERBOSE=1``) keeps
all of it. Nothing is lost: Ray writes every line to its session's log folder.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager

__all__ = ["Feed", "RayStartFailed", "current", "init_ray", "quiet_ray", "stage", "verbose", "watch_feed"]

_LOG_INTERVAL_S = 30.0
_active: list["_StageBar"] = []


def verbose() -> bool:
    return os.environ.get("TITOK_VERBOSE", "") not in ("", "0")


class _LineStream:
    """A log, not a terminal: tqdm's redraws become lines, at most one per interval (tqdm's monitor
    redraws every 10 s whatever its ``mininterval``), repeats dropped; ``final`` lets the last through."""

    def __init__(self, stream):
        self.stream, self.last, self.last_time, self.final = stream, None, time.monotonic(), False

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        due = self.final or time.monotonic() - self.last_time >= _LOG_INTERVAL_S
        if line and line != self.last and due:
            self.stream.write(line + "\n")
            self.last, self.last_time = line, time.monotonic()

    def flush(self) -> None:
        self.stream.flush()


# the unit carries its leading space (" rows"), so the rate reads "2.9 rows/s" (never inverted: "s/ rows")
_COUNTED = "{desc} {n_fmt}/{total_fmt}{unit} {percentage:3.0f}% [{elapsed}<{remaining}, {rate_noinv_fmt}]{postfix}"
_UNCOUNTED = "{desc} {n_fmt}{unit} [{elapsed}, {rate_noinv_fmt}]{postfix}"


class _StageBar:
    """A stage's one line: ``[name] done/total unit pct [elapsed<eta, rate] postfix``."""

    def __init__(self, name: str, stream=None):
        from tqdm import tqdm

        stream = stream or sys.stderr
        terminal = hasattr(stream, "isatty") and stream.isatty()
        self.started, self.note, self.counted, self.terminal = time.perf_counter(), "", False, terminal
        self.job = None  # the training job the steps belong to (a zoo's worker group trains several)
        self.lines = None if terminal else _LineStream(stream)
        self.bar = tqdm(total=None, desc=f"[{name}]", unit=" rows", file=self.lines or stream,
                        mininterval=0.5 if terminal else _LOG_INTERVAL_S, delay=0 if terminal else _LOG_INTERVAL_S,
                        dynamic_ncols=terminal, ascii=not terminal, leave=True, bar_format=_UNCOUNTED)

    def start(self, total: int, unit: str = "rows") -> "_StageBar":
        """The size of the work (rows, steps); counting starts again at zero."""
        self.bar.total, self.bar.n = total, 0  # not tqdm's reset(): that draws a line at once
        self.bar.last_print_n = 0  # tqdm draws again only past the count it last drew (a zoo's next job)
        self.bar.start_t = self.bar._time()  # the next job's rate and time left are its own
        self.bar.unit, self.bar.bar_format, self.counted = f" {unit}", _COUNTED, True
        return self

    def update(self, n: int = 0, **postfix) -> None:
        if postfix:
            self.bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in postfix.items()), refresh=False)
        self.bar.update(n)

    def set(self, done: int, **postfix) -> None:
        """Where the work is now (training: the step), for work that reports positions, not increments."""
        self.update(done - self.bar.n, **postfix)

    def add_note(self, text: str) -> None:
        """Said once, on the stage's last line (e.g. how many answers kept their generation log-probs)."""
        self.note = f"{self.note}; {text}" if self.note else text

    def close(self) -> None:
        seconds = time.perf_counter() - self.started
        postfix = (self.bar.postfix or "").lstrip(", ")
        tail = "; ".join(part for part in (postfix, self.note) if part)
        if not self.counted:  # nothing counted: the stage's line is its time and outcome
            self.bar.bar_format = "{desc} done in " + f"{seconds:.1f} s" + "{postfix}"
        self.bar.set_postfix_str(tail, refresh=False)
        if self.lines:
            self.lines.final = True
        self.bar.refresh()  # the last state, always written
        self.bar.leave = self.terminal  # a log has that line already; a terminal's close ends it with a newline
        self.bar.close()


@contextmanager
def stage(name: str, stream=None):
    """One bar for the stage ``name`` while it runs; its last line stays."""
    bar = _StageBar(name, stream)
    _active.append(bar)
    try:
        yield bar
    finally:
        _active.remove(bar)
        bar.close()


def current() -> "_StageBar | None":
    """The bar of the stage running on this driver (None outside a stage: a library call)."""
    return _active[-1] if _active else None


class Feed:
    """A tiny Ray actor the workers push progress to and the driver drains; the bar stays on the driver."""

    def __init__(self):
        self.items: list = []

    def push(self, item) -> None:
        self.items.append(item)

    def drain(self) -> list:
        items, self.items = self.items, []
        return items


@contextmanager
def watch_feed(apply, interval_s: float = 0.5):
    """A ``Feed`` actor (no CPU) whose items ``apply`` gets on the driver while the block runs; yields
    its handle for the workers. The last items are applied before the block's end returns."""
    import ray

    feed = ray.remote(num_cpus=0)(Feed).remote()
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(interval_s):
            for item in ray.get(feed.drain.remote()):
                apply(item)

    thread = threading.Thread(target=poll, daemon=True, name="titok-progress")
    thread.start()
    try:
        yield feed
    finally:
        stop.set()
        thread.join()
        try:
            for item in ray.get(feed.drain.remote(), timeout=10):
                apply(item)
        except Exception:  # noqa: BLE001 - progress is never worth failing a finished stage for
            pass
        ray.kill(feed)


class RayStartFailed(RuntimeError):
    """Ray did not start: its node did not register in Ray's fixed 30 s, every try (a busy machine), or
    an error no retry mends (Ray's first line says which)."""


_RAY_START_TRIES = "TITOK_RAY_START_TRIES"  # default 3: on a very busy machine a user may want more


def init_ray(tries: int | None = None) -> None:
    """Ray for a titok command: the cluster in ``RAY_ADDRESS`` (``ray job submit``), else a local Ray
    of its own (``address="local"``: never a head some ``ray start`` left on this host, which
    ``ray.init()`` would join); already started (a test, a notebook): left as it is. Ray waits a fixed
    30 s for its node to register (``ray._private.node``, not a setting), which a loaded machine misses:
    such a start is cleaned up, every process of it, and tried again, ``tries`` times
    (``TITOK_RAY_START_TRIES``). Workers' stdout stays in Ray's log files unless verbose."""
    import ray

    quiet_ray()  # before ray.init: it logs the token notice
    if ray.is_initialized():
        return
    options = {} if verbose() else {"log_to_driver": False, "logging_level": logging.WARNING}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**options)
    else:
        _start_local_ray(options, tries or int(os.environ.get(_RAY_START_TRIES, "3")))
    from titok import signals

    signals.reinstall()
    quiet_ray()


def _start_local_ray(options: dict, tries: int) -> None:
    import psutil
    import ray

    for attempt in range(1, tries + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(address="local", **options)
            return
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for a node that did not register
            ray.shutdown()
            # a start that failed half way is no node ray.shutdown knows: its GCS, raylet and agents
            # would live on until this process exits, taking the CPU the next try needs
            _kill(p for p in psutil.Process().children(recursive=True) if p.pid not in before)
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "timed out during startup" not in str(err):
                raise RayStartFailed(f"a local Ray did not start ({why})") from None
            if attempt == tries:
                raise RayStartFailed(f"a local Ray did not start in {tries} tries ({why}); the machine may be "
                                     f"overloaded ({_RAY_START_TRIES} sets the tries): a rerun resumes where this "
                                     "run stopped") from None
            print(f"warning: a local Ray did not start ({why}); trying again ({attempt + 1} of {tries})",
                  file=sys.stderr, flush=True)
            time.sleep(5 * attempt)


def _kill(processes) -> None:
    import psutil

    processes = list(processes)
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


# loggers whose lines say nothing a titok user acts on, and the level that still reaches the screen
_QUIET_LOGGERS = {
    "ray.data": logging.WARNING,  # per-dataset "execution finished in 0.00 seconds" and plans
    "ray.train": logging.WARNING,
    "ray.tune": logging.WARNING,
    "ray.data._internal.progress": logging.ERROR,  # "Progress bars disabled": titok draws its own
    # "Token authentication is enabled for this Ray cluster": true of every local Ray since 2.52
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
}


def quiet_ray() -> None:
    """Known-harmless Ray output off the screen for this driver (see the module docstring)."""
    if verbose():
        return
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
