"""Every collective titok calls itself (DeepSpeed makes its own), on the training device.

Ray Train gives GPU workers an NCCL process group, and NCCL takes CUDA tensors only: a scalar made
with ``torch.tensor(x)`` lives on the host and fails the first micro-step of a GPU run, while gloo
(every CPU test) takes it. So each helper builds its tensor from one that is on the training device
already (the loss) or on the ``device`` it is given, never on the default one. No other titok module
calls ``torch.distributed``; ``titok.train.device_rules`` checks this rule on CPU.

Written by hand: two scalar all-reduces per step and one count at a job's end; nothing in Ray Train
or DeepSpeed agrees on a non-finite loss across ranks, averages a logged value or sums a count.
"""

from __future__ import annotations

import torch

__all__ = ["all_ranks_finite", "mean_over_workers", "sum_over_workers"]


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def all_ranks_finite(loss: torch.Tensor) -> bool:
    """True only if every rank's ``loss`` is finite (one scalar all-reduce on ``loss``'s device), so
    that all ranks stop at the same micro-step instead of one waiting in a collective for another."""
    flag = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    if _distributed():
        import torch.distributed as dist

        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def mean_over_workers(value: float, device: torch.device) -> float:
    """``value`` averaged over the data-parallel ranks (a logged loss), reduced on ``device``."""
    if not _distributed():
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def sum_over_workers(counts: list[int], device: torch.device) -> list[int]:
    """``counts`` summed over the data-parallel ranks (each rank's share of a tally), reduced on ``device``."""
    if not _distributed():
        return counts
    import torch.distributed as dist

    tensor = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(tensor)
    return [int(c) for c in tensor.tolist()]
