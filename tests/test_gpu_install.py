"""The GPU-node install (``cluster/requirements-gpu.txt`` with titok itself) resolves: pip picks one
version of everything without installing it, so an image can be built. pip runs isolated from this
machine's own configuration (its local wheels, CPU torch and version cap), as an image build would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _pins() -> dict[str, str]:
    lines = (REPO / "cluster" / "requirements-gpu.txt").read_text().splitlines()
    pins = [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]
    return {p.split("==")[0].split("[")[0]: p.split("==")[1] for p in pins}


def test_the_gpu_node_install_resolves_with_titok(tmp_path):
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed",
                           "--quiet", "--report", str(report), "-r", str(REPO / "cluster" / "requirements-gpu.txt"),
                           str(REPO)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    pins = _pins()
    assert {name: resolved.get(name) for name in pins} == pins  # every pin holds, titok's own ranges included
    assert resolved["titok"] and not resolved["torch"].endswith("+cpu")  # PyPI's CUDA build, as on a GPU node
    assert any(name.startswith("nvidia-") for name in resolved)


def test_the_pins_agree_with_titoks_own():
    pyproject = (REPO / "pyproject.toml").read_text()
    pins = _pins()
    assert f'"torch=={pins["torch"]}"' in pyproject and f'"vllm=={pins["vllm"]}"' in pyproject
    assert f'"ray[data,train,default]=={pins["ray"]}"' in pyproject
