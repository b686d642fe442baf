"""What one LoRA training needs, typed: the object that crosses from the driver into Ray Train's workers.

A transplant's target LoRA, a zoo's adapters and ``titok sft``'s source LoRA are all built by
``TrainingJob.of`` from the typed ``TrainConfig``; ``train.ray_train`` hands the jobs to its workers
as they are (Ray pickles them), so a worker reads ``job.train.lr``, never a string key. The
settings that shape a worker group and the target it loads are ``WorkerGroup``'s fields, so jobs
share one group exactly when their ``WorkerGroup`` values are equal: no second list of names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from titok.config import TrainConfig

__all__ = ["TrainingJob", "WorkerGroup"]


@dataclass(frozen=True)
class WorkerGroup:
    """The target and the train settings one Ray Train worker group runs with: the workers, how the
    target loads (dtype, ZeRO stage, offload, checkpointing) and how often the group restarts."""

    target_base: str
    trust_remote_code: bool
    workers: int
    use_gpu: bool
    cpus_per_worker: int
    dtype: str
    deepspeed_stage: int
    deepspeed_config: str | None
    gradient_checkpointing: bool | str
    offload_optimizer: bool
    offload_params: bool
    max_failures: int

    @classmethod
    def of(cls, target_base: str, trust_remote_code: bool, train: TrainConfig) -> "WorkerGroup":
        from_train = {f.name for f in fields(cls)} - {"target_base", "trust_remote_code"}
        return cls(target_base, trust_remote_code, **train.model_dump(include=from_train))


@dataclass(frozen=True)
class TrainingJob:
    """One fresh LoRA to train: its worker group, its recipe (``train``: LoRA shape, lr, epochs,
    batches, loss), its seed, its event log (``run_dir``), its token budget and the k of its
    selective loss. ``kept_rates_dir``: where each rate of an ``lr_search`` is kept once trained (its
    adapter and validation curve), so a rerun whose search adds rates trains only the new ones; None:
    not kept. ``check_adapter``: a kept rate's folder whose LoRA is not trained but only answers the
    held-out queries (it was kept by a run without that check). ``fault_at_step`` and ``fault_marker``
    are a test hook (``ray_train._inject_fault``)."""

    group: WorkerGroup
    train: TrainConfig
    seed: int
    run_dir: str
    max_length: int
    k: float
    kept_rates_dir: str | None = None
    check_adapter: str | None = None
    fault_at_step: int | None = None
    fault_marker: str | None = None

    @classmethod
    def of(cls, train: TrainConfig, target_base: str, seed: int, run_dir: str, max_length: int, k: float,
           trust_remote_code: bool = False, kept_rates_dir: str | None = None) -> "TrainingJob":
        """The one way a training job is made (transplant, zoo and ``titok sft`` alike)."""
        return cls(WorkerGroup.of(target_base, trust_remote_code, train), train, seed, str(run_dir), max_length, k,
                   kept_rates_dir)

    def with_lr(self, lr: float | None) -> "TrainingJob":
        """This job at one learning rate of its ``lr_search`` (itself for ``None``)."""
        if lr is None:
            return self
        return replace(self, train=self.train.model_copy(update={"lr": lr, "lr_search": []}))

    def checking(self, adapter_dir: str) -> "TrainingJob":
        """This job's held-out answers check alone, on the LoRA in ``adapter_dir`` (kept, trained before)."""
        return replace(self, check_adapter=str(adapter_dir))
