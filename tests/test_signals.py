"""Stop means stop: Ctrl-C (SIGINT) and SIGTERM end `titok transplant` within seconds with 130 / 143
and one line, leave no process of the local Ray it started, keep every finished stage and mark none
that did not finish. A dead raylet and a killed driver end in one line too."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml


def _config(dirs: dict, run_dir: Path) -> dict:
    return {"source_base": dirs["source"], "source_adapter": dirs["adapter"], "target_base": dirs["target"],
            "task": "boolean_expressions", "run_dir": str(run_dir),
            "engine": {"dtype": "float32", "batch_size": 4, "max_length": 160},
            "queries": {"few_shot": 2, "pool_size": 12, "max_new_tokens": 16, "max_rounds": 3, "on_task": False},
            "labels": {"max_new_tokens": 20}, "filter": {"top_m": 6, "k": 0.7},
            "train": {"workers": 2, "epochs": 2, "global_batch_size": 2, "micro_batch_size": 1, "lr": 1e-3}}


def _command(tmp_path: Path, dirs: dict, name: str, long_labels: bool = False, one_per_batch: bool = False):
    path = tmp_path / f"{name}.yaml"
    config = _config(dirs, tmp_path / name)
    if long_labels:  # a labels stage of seconds, not half of one, to stop in
        config["labels"]["max_new_tokens"], config["engine"]["batch_size"] = 96, 1
    if one_per_batch:  # a query round of many engine batches, to stop between them
        config["engine"]["batch_size"] = 1
    path.write_text(yaml.safe_dump(config))
    return [sys.executable, "-m", "titok.cli", "transplant", "--config", str(path)]


def _ray_processes(ray_tmp: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", ray_tmp], capture_output=True, text=True).stdout.splitlines()
    return [line for line in found if "pgrep" not in line]


def _wait_for(marker: Path, process: subprocess.Popen) -> None:
    """Until the run writes ``marker`` (a stage's _STARTED.json), with the run still going."""
    deadline = time.time() + 600
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1][-3000:]


@pytest.fixture
def ray_tmp():
    """A temp dir of the titok process's own Ray (short: Ray's socket paths must fit 107 bytes), so its
    processes can be found by their command lines."""
    folder = tempfile.mkdtemp(prefix="tks", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("signum, stage", [(signal.SIGINT, "queries"), (signal.SIGTERM, "labels")])
def test_a_signal_stops_the_run_at_once(tiny_model_dirs, tmp_path, ray_tmp, signum, stage):
    """Sent to the ``titok`` command, as a terminal's Ctrl-C or a ``kill`` would. Labels stream into the
    scores as they come, so a stop in labels is a stop in scores too. A stop in training, and the resume
    to the adapter of an uninterrupted run, are in ``test_pipeline``. A query round on a real model is an
    hour: a stop inside one keeps every engine batch already back (``queries.progress.json``), and the same
    command sends the engines only the round's other prompts."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TITOK_VERBOSE")} | {"RAY_TMPDIR": ray_tmp}
    stopped = _command(tmp_path, tiny_model_dirs, "stopped", long_labels=stage == "labels",
                       one_per_batch=stage == "queries")
    process = subprocess.Popen(stopped, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    started = tmp_path / "stopped" / stage / "_STARTED.json"
    _wait_for(started, process)
    progress_file = tmp_path / "stopped" / "queries.progress.json"
    if stage == "queries":  # inside the round: a batch checked, engine calls running
        while process.poll() is None and not (progress_file.exists() and (
                json.loads(progress_file.read_text()).get("round_written") or {}).get("checked")):
            time.sleep(0.02)
    else:
        time.sleep(0.5)  # inside the stage: engine calls running
    sent = time.time()
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    seconds = time.time() - sent
    assert process.returncode == 128 + signum, err[-3000:]
    assert seconds < 30, seconds
    assert err.strip().splitlines()[-1] == (f"titok: stopped by {signal.Signals(signum).name}; finished stages are "
                                            "kept in the run directory, and the same command resumes from them")
    assert "Traceback" not in err
    for _ in range(50):  # Ray's processes end with the session; give them a moment
        if not _ray_processes(ray_tmp):
            break
        time.sleep(0.2)
    assert _ray_processes(ray_tmp) == []
    run = tmp_path / "stopped"
    assert not (run / stage / "_COMPLETE.json").exists() and not (run / "scores" / "_COMPLETE.json").exists()
    if stage == "labels":
        assert (run / "queries" / "_COMPLETE.json").exists()  # finished before the signal: kept
        return
    at_stop = json.loads(progress_file.read_text())
    in_round = at_stop["round_written"]
    back = in_round["checked"] + len(in_round["waiting"])
    assert in_round["round"] == 0 and 0 < back < in_round["prompts"], in_round
    assert len(at_stop["kept"]) + sum(at_stop["rejected"].values()) == in_round["checked"]  # counted as they came

    resumed = subprocess.run([*stopped, "--until", "queries"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    from titok.runstate import RunDir

    (event,) = [e for e in RunDir(run).events() if e["event"] == "queries_resumed"]
    assert (event["round"], event["prompts"], event["kept_from_stop"], event["sent"]) == (
        1, in_round["prompts"], back, in_round["prompts"] - back)
    done = json.loads(progress_file.read_text())
    assert done["round_written"] is None and done["written"] >= in_round["prompts"]
    assert done["kept"][:len(at_stop["kept"])] == at_stop["kept"]  # what was kept at the stop stays, first

@pytest.mark.slow
def test_a_dead_raylet_ends_the_run_in_one_line_that_says_it_resumes(tiny_model_dirs, tmp_path, ray_tmp):
    """The raylet killed mid-run: one line, exit 1, nothing of that Ray left, the stage not marked."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TITOK_VERBOSE")} | {"RAY_TMPDIR": ray_tmp}
    process = subprocess.Popen(_command(tmp_path, tiny_model_dirs, "dead"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    started = tmp_path / "dead" / "queries" / "_STARTED.json"
    _wait_for(started, process)
    raylets = [line for line in _ray_processes(ray_tmp) if "/raylet " in line]
    assert len(raylets) == 1, raylets
    os.kill(int(raylets[0].split()[0]), signal.SIGKILL)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    # Ray ends the driver from C++ (the command's watcher says so), or raises ActorDiedError where an actor
    # was starting on the dead node: one line either way
    assert last.startswith(("titok: Ray ended the run's process", "titok: Ray lost part of the run")), err[-3000:]
    assert "the same command resumes" in last
    assert "Traceback" not in err + out
    for _ in range(50):
        if not _ray_processes(ray_tmp):
            break
        time.sleep(0.2)
    assert _ray_processes(ray_tmp) == []
    assert not (tmp_path / "dead" / "queries" / "_COMPLETE.json").exists()


@pytest.mark.slow
def test_a_killed_driver_is_named_in_one_line(tiny_model_dirs, tmp_path, ray_tmp):
    """The out-of-memory killer's SIGKILL on the process doing the run (the ``titok`` command's child)
    leaves no Python to say anything: the command watching it does, in one line, exit 137."""
    import psutil

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TITOK_VERBOSE")} | {"RAY_TMPDIR": ray_tmp}
    process = subprocess.Popen(_command(tmp_path, tiny_model_dirs, "killed"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    started = tmp_path / "killed" / "queries" / "_STARTED.json"
    _wait_for(started, process)
    (driver,) = [p for p in psutil.Process(process.pid).children() if "titok.cli" in " ".join(p.cmdline())]
    driver.kill()
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert err.strip().splitlines()[-1] == ("titok: the run's process was killed by SIGKILL (out of memory, or killed "
                                            "by hand); finished stages are kept in the run directory, and the same "
                                            "command resumes from them")
    assert "Traceback" not in err
    for _ in range(100):  # Ray's processes share their driver's fate
        if not _ray_processes(ray_tmp):
            break
        time.sleep(0.2)
    assert _ray_processes(ray_tmp) == []


def test_a_stop_leaves_work_running_in_threads_without_waiting_for_it():
    """A compare's or zoo's worker groups train in threads (``signals.thread_map``), each blocked in a
    ``ray.get`` no signal reaches: a stop must not wait for them to end (it waited for the whole training)."""
    script = (
        "import os, signal, sys, threading, time\n"
        "from titok import signals\n"
        "signals.install()\n"
        "threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
        "started = time.monotonic()\n"
        "try:\n"
        "    signals.thread_map(lambda s: time.sleep(s), [60, 60, 0.1], 2)\n"
        "except signals.Stopped:\n"
        "    print(round(time.monotonic() - started, 1), flush=True)\n"
        "    os._exit(signals.received() + 128)\n"  # as the command exits: threads are not joined
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + signal.SIGINT, result.stderr[-2000:]
    assert float(result.stdout) < 5


def test_a_second_stop_exits_at_once_in_one_line_and_is_not_blamed_on_ray():
    """A person's second Ctrl-C during a slow cleanup: exit 130 at once, one line that says so, and the
    supervising ``titok`` parent told Python chose the exit (it said "Ray ended the run's process")."""
    script = (
        "import time\n"
        "from titok import signals\n"
        "signals.install()\n"
        "try:\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "except signals.Stopped:\n"
        "    time.sleep(60)\n"  # a cleanup that takes long
    )
    read_end, write_end = os.pipe()
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, TITOK_SUPERVISOR_FD=str(write_end)), pass_fds=(write_end,))
    os.close(write_end)
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGINT)
    time.sleep(1.5)  # later than a copy of the first stop
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGINT, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("titok: stopped at once on a second SIGINT, without cleanup")
    assert os.read(read_end, 1) == b"1"
    os.close(read_end)
