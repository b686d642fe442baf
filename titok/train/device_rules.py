"""NCCL's device rule, checked on CPU: a collective on a tensor that would live on the host is refused.

On a GPU worker the default device is the host while training runs on the GPU, and NCCL refuses a
host tensor at the first collective. On a CPU worker (gloo) both are the CPU, so ``torch.tensor(x)``
given to ``all_reduce`` passes every CPU test and crashes the first GPU run. ``host_tensors_refused``
tells the two apart by where each tensor comes from: while it is active, a tensor is *on the host*
if a factory made it without a device (``torch.tensor(x)``, ``torch.zeros(n)``, ``from_numpy``), if
``.cpu()`` made it, or if it was computed from host tensors alone. Tensors given a device explicitly
(``device=``, ``.to(device)``) and everything computed from the model or the batch count as on the
training device. A ``torch.distributed`` collective (titok's or DeepSpeed's) on a host tensor raises,
as NCCL would. What it cannot see: code that names ``"cpu"`` as the device on purpose.

Ray Train workers run their loop under it when ``TITOK_GPU_RULES=1`` is set for the driver
(``ray_train`` passes it on); the tests set it. Written by hand: torch has no host/device split on a
CPU-only machine to check against.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["ENV", "HostTensorError", "enabled", "host_tensors_refused"]

ENV = "TITOK_GPU_RULES"

COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
               "isend", "irecv")

_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.linspace, torch.rand, torch.randn, torch.randint, torch.scalar_tensor}


class HostTensorError(RuntimeError):
    """A collective got a tensor that is on the host on a GPU worker (NCCL on torch 2.11, seen on an
    H200: 'No backend type associated with device type cpu')."""


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


class _Tracker(TorchFunctionMode):
    """Marks the tensors that would be on the host if the training device were a GPU."""

    def __init__(self):
        super().__init__()
        self.host: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> tensor (ids, not ==)

    def is_host(self, tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and self.host.get(id(tensor)) is tensor

    def _mark(self, tensor: torch.Tensor, on_host: bool) -> None:
        if on_host:
            self.host[id(tensor)] = tensor
        elif self.is_host(tensor):
            del self.host[id(tensor)]

    @staticmethod
    def _placed(func, args, kwargs) -> bool | None:
        """True: put on a device by name; False: put on the host; None: where its inputs are."""
        if func in _FACTORIES:
            return kwargs.get("device") is not None
        if func is torch.Tensor.cpu:
            return False
        if func is torch.Tensor.cuda:
            return True
        if func is torch.Tensor.to and (kwargs.get("device") is not None
                                        or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])):
            return True
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        placed = self._placed(func, args, kwargs)
        on_host = (bool(inputs) and all(self.is_host(t) for t in inputs)) if placed is None else not placed
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or (placed is None and any(tensor is t for t in inputs)):
                continue  # an in-place op keeps its tensor where it was
            self._mark(tensor, on_host)
        return out


_lock = threading.Lock()


@contextlib.contextmanager
def host_tensors_refused():
    """Within it, ``torch.distributed`` collectives refuse host tensors; yields a Counter of the
    collectives it checked (by name), so a test can see that the check ran at all."""
    import torch.distributed as dist

    tracker, checked = _Tracker(), Counter()

    def guarded(name, original):
        def collective(*args, **kwargs):
            for tensor in tree_flatten((args, kwargs))[0]:
                if tracker.is_host(tensor):
                    raise HostTensorError(
                        f"torch.distributed.{name} got a tensor made on the host (shape {tuple(tensor.shape)}, "
                        f"{tensor.dtype}): NCCL takes tensors on the training device only; make it with "
                        "device=<the training device> or from a tensor already there")
            checked[name] += 1
            return original(*args, **kwargs)

        return collective

    from_numpy = torch.from_numpy  # not a torch function: modes never see it

    def host_from_numpy(array):
        tensor = from_numpy(array)
        tracker._mark(tensor, on_host=True)
        return tensor

    with _lock:
        originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        for name, original in originals.items():
            setattr(dist, name, guarded(name, original))
        torch.from_numpy = host_from_numpy
    try:
        with tracker:
            yield checked
    finally:
        with _lock:
            for name, original in originals.items():
                setattr(dist, name, original)
            torch.from_numpy = from_numpy
