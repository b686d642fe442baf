"""Which rows each worker trains on at each step: the recipe is fixed by the global batch, not by the
cluster that happens to run it.

``train.global_batch_size`` samples make one optimizer step whatever the number of workers; each
worker takes its contiguous slice of the step's rows and splits it into micro-batches, and gradient
accumulation covers the rest. 1 worker x 2 micro-batches and 2 workers x 1 micro-batch therefore see
the same micro-batches and average the same gradients. The row order is a pure function of
(seed, epoch), so every worker computes it alone (no coordination), and a run resumed at step s
takes exactly the rows an uninterrupted run takes there.

Hand-written because Ray Data's ``streaming_split`` and ``random_shuffle`` promise neither which
worker gets a row nor a reproducible order across worker counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BatchPlan", "epoch_order", "plan_batches", "train_plan", "worker_micro_batches"]


@dataclass(frozen=True)
class BatchPlan:
    rows: int  # training samples
    global_batch: int  # samples per optimizer step, over all workers
    workers: int
    micro_batch: int  # samples per forward pass on one worker
    accumulation: int  # micro-batches per worker per optimizer step
    steps_per_epoch: int
    epochs: int
    max_steps: int | None = None  # a step budget instead of whole epochs

    @property
    def total_steps(self) -> int:
        return self.max_steps or self.steps_per_epoch * self.epochs

    @property
    def per_worker(self) -> int:
        return self.micro_batch * self.accumulation


def plan_batches(rows: int, global_batch: int, workers: int, max_micro_batch: int, epochs: int,
                 max_steps: int | None = None) -> BatchPlan:
    """The largest micro-batch <= ``max_micro_batch`` that divides each worker's share of a step;
    ``max_steps`` (when set) replaces ``epochs`` as the length of the run.

    Raises ValueError when the global batch cannot be split evenly over the workers or holds more
    samples than there are.
    """
    if global_batch % workers:
        raise ValueError(f"train.global_batch_size={global_batch} is not a multiple of train.workers={workers}")
    if rows < global_batch:
        raise ValueError(f"train.global_batch_size={global_batch} is larger than the {rows} training samples; "
                         "lower it (or keep more samples)")
    per_worker = global_batch // workers
    micro = max(d for d in range(1, min(max_micro_batch, per_worker) + 1) if per_worker % d == 0)
    return BatchPlan(rows=rows, global_batch=global_batch, workers=workers, micro_batch=micro,
                     accumulation=per_worker // micro, steps_per_epoch=-(-rows // global_batch), epochs=epochs,
                     max_steps=max_steps)


def train_plan(n_rows: int, train, workers: int) -> BatchPlan:
    """The batch plan of a training on ``n_rows`` samples under ``train`` (``config.TrainSettings``):
    the samples it holds out for validation (``train.validation_fraction``) train on no step."""
    from titok.core.validation_split import validation_count

    n_train = n_rows - validation_count(n_rows, train.validation_fraction)
    return plan_batches(n_train, train.global_batch_size, workers, train.micro_batch_size, train.epochs, train.max_steps)


def epoch_order(rows: int, seed: int, epoch: int, global_batch: int) -> np.ndarray:
    """A shuffled order of ``range(rows)`` for this epoch, padded to whole steps by wrapping around
    to its start (as ``torch.utils.data.DistributedSampler`` pads), so no sample is dropped."""
    order = np.random.default_rng([seed, epoch]).permutation(rows)
    padding = -rows % global_batch
    return np.concatenate([order, order[:padding]]) if padding else order


def worker_micro_batches(order: np.ndarray, plan: BatchPlan, step_in_epoch: int, rank: int) -> list[np.ndarray]:
    """Row indices of each micro-batch worker ``rank`` runs for optimizer step ``step_in_epoch``."""
    start = step_in_epoch * plan.global_batch + rank * plan.per_worker
    mine = order[start : start + plan.per_worker]
    return [mine[i : i + plan.micro_batch] for i in range(0, plan.per_worker, plan.micro_batch)]
