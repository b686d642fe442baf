"""Stop means stop: Ctrl-C (SIGINT) and SIGTERM end `titok transplant` within seconds with 130 / 143
and one line, leave no process of the local Ray it started, keep every finished stage and mark none
that did not finish; the same command then resumes from them."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file


def _config(dirs: dict, run_dir: Path) -> dict:
    return {"source_base": dirs["source"], "source_adapter": dirs["adapter"], "target_base": dirs["target"],
            "task": "boolean_expressions", "run_dir": str(run_dir),
            "engine": {"dtype": "float32", "batch_size": 4, "max_length": 160},
            "queries": {"few_shot": 2, "pool_size": 12, "max_new_tokens": 16, "max_rounds": 3},
            "labels": {"max_new_tokens": 20}, "filter": {"top_m": 6, "k": 0.7},
            "train": {"workers": 2, "epochs": 2, "global_batch_size": 2, "micro_batch_size": 1, "lr": 1e-3}}


def _command(tmp_path: Path, dirs: dict, name: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_config(dirs, tmp_path / name)))
    return [sys.executable, "-m", "titok.cli", "transplant", "--config", str(path)]


def _ray_processes(ray_tmp: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", ray_tmp], capture_output=True, text=True).stdout.splitlines()
    return [line for line in found if "pgrep" not in line]


@pytest.fixture
def ray_tmp():
    """A temp dir of the titok process's own Ray (short: Ray's socket paths must fit 107 bytes), so its
    processes can be found by their command lines."""
    folder = tempfile.mkdtemp(prefix="tks", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("signum, stage", [(signal.SIGINT, "queries"), (signal.SIGTERM, "train")])
def test_a_signal_stops_the_run_and_the_rerun_resumes(tiny_model_dirs, tmp_path, ray_tmp, signum, stage):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TITOK_VERBOSE")} | {"RAY_TMPDIR": ray_tmp}
    stopped = _command(tmp_path, tiny_model_dirs, "stopped")
    process = subprocess.Popen(stopped, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    started = tmp_path / "stopped" / stage / "_STARTED.json"
    deadline = time.time() + 600
    while not started.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, process.communicate()[1][-3000:]
    time.sleep(2 if stage == "train" else 1.0)  # inside the stage: Ray Train workers or engine calls running
    sent = time.time()
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    seconds = time.time() - sent
    assert process.returncode == 128 + signum, err[-3000:]
    assert seconds < 30, seconds
    assert f"stopped by {signal.Signals(signum).name}" in err and "the same command resumes" in err
    assert "Traceback" not in err
    for _ in range(50):  # Ray's processes end with the session; give them a moment
        if not _ray_processes(ray_tmp):
            break
        time.sleep(0.2)
    assert _ray_processes(ray_tmp) == []
    run = tmp_path / "stopped"
    assert not (run / stage / "_COMPLETE.json").exists()

    if stage == "queries":
        return  # the resume after a stop in training covers the rerun (a run costs a minute of CI)
    resumed = subprocess.run(stopped, capture_output=True, text=True, env=env, timeout=900)
    assert (run / "queries" / "_COMPLETE.json").exists()  # kept from before the signal
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[queries] complete in" in resumed.stdout and "[labels] complete in" in resumed.stdout  # reused
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())
