"""Stop means stop: SIGINT (Ctrl-C) and SIGTERM (Kubernetes, ``ray job stop``) end a titok command
within seconds, whatever it is waiting on.

The handler raises ``Stopped``, a KeyboardInterrupt, in the main thread: no ``except Exception`` in a
stage swallows it, and it is the one exception Ray's blocking calls pass on when a signal handler
raises (``ray.get`` turns any other into a SystemError once the awaited task ends, which let a
SIGTERMed training run to its end); Ray raises its own KeyboardInterrupt, so the signal's number is
kept here (``received``). Ray Train's own SIGINT handler (abort the training, carry on) is switched
off by titok's trainer. The command then drops its engines without their graceful
shutdown (``stopping()``: every second counts, and Ray ends their processes with the session),
disconnects from Ray, shutting down a local Ray it started (no process of it left), and exits 130 or
143 with one line: finished stages are kept and marked, the interrupted one is not, so the same
command resumes. A second signal while stopping exits at once; copies of the first that arrive within
a second are one stop (``ray job stop`` signals every process of a job, and the ``titok`` command
passes the signal on to its child too, see ``titok.supervise``). Work done side by side in threads
(``thread_map``: a zoo's stages, the worker groups of a compare or zoo) is left running on a stop, not
waited for.
"""

from __future__ import annotations

import os
import signal
import time

__all__ = ["Stopped", "install", "received", "reinstall", "stopping", "thread_map"]

_stopping = False
_received: int | None = None
_first_at = 0.0
_SAME_STOP_S = 1.0  # copies of one stop arrive within milliseconds; a person's second Ctrl-C later


class Stopped(KeyboardInterrupt):
    """A stop signal arrived; ``code`` is the exit status (128 + the signal's number)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.code = signum, 128 + signum


def stopping() -> bool:
    """A stop signal arrived: cleanup should be quick, not graceful."""
    return _stopping


def received() -> int:
    """The stop signal that arrived (SIGINT for a KeyboardInterrupt no handler of ours saw)."""
    return _received or signal.SIGINT


def _handle(signum, frame) -> None:
    global _stopping, _received, _first_at
    if _stopping:
        if time.monotonic() - _first_at < _SAME_STOP_S:
            return  # another copy of the stop in progress
        _exit_now(signum)  # asked twice: no more cleanup
    _stopping, _received, _first_at = True, signum, time.monotonic()
    raise Stopped(signum)


def _exit_now(signum: int) -> None:
    """Exit without cleanup, in one line; the ``titok`` parent is told Python chose this exit, so it does
    not report the run's process as ended by Ray."""
    import sys

    from titok import supervise

    print(f"titok: stopped at once on a second {signal.Signals(signum).name}, without cleanup (a local Ray may "
          f"take a few seconds to go); {supervise.RESUMES}", file=sys.stderr, flush=True)
    supervise.python_finished()
    os._exit(128 + signum)


_installed = False


def install() -> None:
    """SIGINT and SIGTERM raise ``Stopped`` in the main thread (call from the main thread)."""
    global _installed
    signal.signal(signal.SIGINT, _handle)
    signal.signal(signal.SIGTERM, _handle)
    _installed = True


def reinstall() -> None:
    """Again after ``ray.init``, which sets its own SIGTERM handler (``sys.exit``, whose unwinding through
    Ray's threads ended in a C++ abort, exit 134); only where a titok command installed them."""
    import threading

    if _installed and threading.current_thread() is threading.main_thread():
        install()


def thread_map(fn, items, workers: int) -> list:
    """``fn`` over ``items`` on ``workers`` threads, the results in order. A stop in the main thread
    leaves at once: ``with ThreadPoolExecutor`` would wait for the threads, and a thread blocked in
    ``ray.get`` on a training (which no signal reaches) held a Ctrl-C until that training ended. The
    command then exits (``os._exit``) and Ray ends the work those threads waited on."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # every future is done, unless a stop came
