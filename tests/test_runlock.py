"""One run per run dir: a second titok process on a held folder is refused at once, naming the
holder; a holder killed with kill -9 leaves no stale lock, and the next run takes over with a warning."""

import os
import signal
import subprocess
import sys

import pytest

from titok.runstate import RunDir, RunInUse

# as compare, zoo and transplant claim: the RunDir is dropped at once, and the claim must outlive it
HOLD = ("import gc, sys, time\nfrom titok.runstate import RunDir\nRunDir(sys.argv[1]).claim()\ngc.collect()\n"
        "print('held', flush=True)\ntime.sleep(120)\n")


def _holder(folder) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path, capsys):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(RunInUse, match=rf"in use by another titok run \(host .+, pid {holder.pid}, since "):
            RunDir(tmp_path / "run").claim()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        RunDir(tmp_path / "run").claim()  # the kernel dropped the dead holder's lock
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "ended without letting go" in err and "taking it over" in err
    finally:
        holder.kill()


def test_a_transplant_on_a_held_run_dir_stops_at_once_naming_the_holder(tiny_model_dirs, tmp_path):
    """`titok transplant` while another process holds its run dir: exit 2, one line naming the holder,
    and the folder's contents untouched (two runs merged silently before: 8 rows for top_m=4)."""
    import yaml

    config = {"source_base": tiny_model_dirs["source"], "source_adapter": tiny_model_dirs["adapter"],
              "target_base": tiny_model_dirs["target"], "task": "boolean_expressions", "run_dir": str(tmp_path / "run"),
              "engine": {"dtype": "float32", "batch_size": 4, "max_length": 160},
              "queries": {"few_shot": 2, "pool_size": 8, "max_new_tokens": 16, "max_rounds": 3, "on_task": False},
              "labels": {"max_new_tokens": 20}, "filter": {"top_m": 4, "k": 0.7},
              "train": {"workers": 1, "epochs": 1, "global_batch_size": 4, "micro_batch_size": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    holder = _holder(tmp_path / "run")
    try:
        before = sorted(p.name for p in (tmp_path / "run").iterdir())
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        second = subprocess.run([sys.executable, "-m", "titok.cli", "transplant", "--config", str(tmp_path / "run.yaml")],
                                capture_output=True, text=True, env=env, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "is in use by another titok run (host" in second.stderr and f"pid {holder.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before  # no stage started
    finally:
        holder.kill()


def test_a_claim_waits_for_a_holder_that_is_exiting(tmp_path):
    """A job resubmitted right after ``kill -9`` of the last one: the killed holder's lock goes only once
    the kernel has freed its memory. A holder of this host that is gone or exiting is waited for (here
    the holder file names a finished process while the lock goes 2 s later); a live one is refused."""
    import json
    import time

    holder = subprocess.Popen([sys.executable, "-c", HOLD.replace("time.sleep(120)", "time.sleep(2)"), str(tmp_path / "run")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunInUse):  # alive and not exiting: refused at once
        RunDir(tmp_path / "run").claim()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder_file = tmp_path / "run" / ".titok.lock.json"
    holder_file.write_text(json.dumps({**json.loads(holder_file.read_text()), "pid": int(finished.stdout)}))
    started = time.monotonic()
    RunDir(tmp_path / "run").claim()
    assert 0.5 < time.monotonic() - started < 30
    holder.wait(timeout=30)
