"""The ``titok`` command runs a Ray-using command in a child process it watches, because a Ray driver
can die where no Python code of it runs: when the node's raylet or object store goes away (killed, out of
memory, or marked dead on a busy machine), Ray's core worker ends the driver from C++ ("The connection to
the plasma store is failed. Terminate the process.", exit 1) with no exception, no ``finally`` and no
atexit; the out-of-memory killer's SIGKILL leaves nothing either. The user then saw Ray's raw log and
no word from titok. The parent loads neither Ray nor torch: it passes each stop signal on to the child
(whose handler takes one stop, however many copies arrive: ``ray job stop`` signals every process of the
job), and when the child ends without its Python finishing (the pipe below stays silent) it says so in
one line, with how to resume.

No library does this: ``subprocess`` gives the child's exit status, not whether its interpreter ran to
the end, hence the one-byte pipe.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

__all__ = ["RESUMES", "is_child", "python_finished", "run_child"]

_FD = "TITOK_SUPERVISOR_FD"  # the write end of the child's "my Python finished" pipe
RESUMES = "finished stages are kept in the run directory, and the same command resumes from them"


def is_child() -> bool:
    return _FD in os.environ


def python_finished() -> None:
    """Tell the parent this process's Python ran to its end (a return, an exception, a handled stop)."""
    fd = os.environ.pop(_FD, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"1")
        os.close(int(fd))
    except OSError:  # the parent is gone: nobody to tell
        pass


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (a parent killed alone, even by SIGKILL,
    must not leave a driver running with no one to report it); Linux only, elsewhere nothing."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_child(argv: list[str]) -> int:
    """Run ``python -m titok.cli argv`` as the child; its exit status, or one line and 1 / 128+N when it
    ended outside Python."""
    read_end, write_end = os.pipe()
    env = dict(os.environ, **{_FD: str(write_end)})
    home = str(Path(__file__).resolve().parents[1])  # titok importable however the parent found it (ray_jobs/)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (home, env.get("PYTHONPATH")) if p)
    child = subprocess.Popen([sys.executable, "-m", "titok.cli", *argv], env=env, pass_fds=(write_end,),
                             preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    os.close(write_end)

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    status = child.wait()
    finished = os.read(read_end, 1) == b"1"
    os.close(read_end)
    if finished:
        return status
    if status < 0:
        name = signal.Signals(-status).name
        why = " (out of memory, or killed by hand)" if -status == signal.SIGKILL else ""
        print(f"titok: the run's process was killed by {name}{why}; {RESUMES}", file=sys.stderr, flush=True)
        return 128 - status
    print(f"titok: Ray ended the run's process (exit {status}: the node's raylet or object store went away, "
          f"killed, out of memory, or marked dead on a busy machine; Ray's last words are above); {RESUMES}",
          file=sys.stderr, flush=True)
    return 1
