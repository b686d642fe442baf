"""NCCL's device rule on CPU (``titok.train.device_rules``) and titok's own collectives
(``titok.train.collectives``) under it: a tensor made on the host is refused in a collective, one
made from the training tensors or on a named device is taken; no titok module but ``collectives``
calls ``torch.distributed`` itself."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from titok.train.collectives import all_ranks_finite, mean_over_workers
from titok.train.device_rules import HostTensorError, host_tensors_refused


@pytest.fixture
def gloo(monkeypatch):
    """A one-process gloo group: collectives run for real."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("make", [
    lambda w: torch.tensor([1.0]),
    lambda w: torch.zeros(2),
    lambda w: torch.from_numpy(np.ones(2, dtype=np.float32)),
    lambda w: (w @ w).cpu(),
    lambda w: torch.tensor([2.0]).float() * 3,  # computed from host tensors alone
], ids=["tensor", "zeros", "from_numpy", "cpu()", "derived"])
def test_a_collective_on_a_host_tensor_is_refused(gloo, make):
    weight = torch.nn.Linear(2, 2).weight.to(torch.device("cpu"))
    with host_tensors_refused() as checked:
        tensor = make(weight)
        with pytest.raises(HostTensorError, match="all_reduce got a tensor made on the host"):
            dist.all_reduce(tensor)
    assert checked["all_reduce"] == 0


def test_tensors_on_the_training_device_pass(gloo):
    device = torch.device("cpu")  # what ray.train.torch.get_device() names on this worker
    with host_tensors_refused() as checked:
        model = torch.nn.Linear(3, 1).to(device)
        loss = model(torch.ones(2, 3).to(device)).pow(2).mean()
        for tensor in (torch.tensor([1.0], device=device), loss.detach().reshape(1),
                       torch.isfinite(loss).float().reshape(1), torch.zeros(1).to(device)):
            dist.all_reduce(tensor)
    assert checked["all_reduce"] == 4
    assert dist.all_reduce is not None and "guarded" not in repr(dist.all_reduce)  # unpatched after the block


def test_titoks_collectives_use_the_training_device(gloo):
    device = torch.device("cpu")
    with host_tensors_refused() as checked:
        loss = torch.nn.Linear(3, 1).to(device)(torch.ones(1, 3).to(device)).sum()
        assert all_ranks_finite(loss) is True
        assert all_ranks_finite(loss * float("nan")) is False
        assert mean_over_workers(2.5, device) == 2.5
    assert checked["all_reduce"] == 3


def test_no_titok_module_but_collectives_imports_torch_distributed():
    """A collective outside ``titok/train/collectives.py`` would escape the device rule above."""
    root = Path(__file__).resolve().parents[1] / "titok"
    importers = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module else []
            if any(n.startswith("torch.distributed") for n in names):
                importers.append(str(path.relative_to(root)))
    assert sorted(set(importers)) == ["train/collectives.py", "train/device_rules.py"]
