"""Train a source LoRA on a task's training examples (the expert to transplant), on Ray Train with
the same DeepSpeed training stage as the transplant (every response token weighted 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from titok import columns as C
from titok.config import SFT_DEFAULTS, TrainConfig, sft_train_config
from titok.export import export_adapter
from titok.models import load_tokenizer
from titok.runstate import RunDir
from titok.core.sequences import encode_response
from titok.tasks import load_task, reference_response
from titok.train.job import TrainingJob
from titok.train.ray_train import copy_adapter, train_adapter

__all__ = ["SFT_DEFAULTS", "sft_train_config", "train_source_adapter"]


def train_source_adapter(base: str, task: str, out_dir: str | Path, train: TrainConfig, seed: int = 0,
                         n_train: int = 256, trust_remote_code: bool = False) -> Path:
    import ray

    from titok.progress import init_ray

    init_ray()
    examples = load_task(task, seed=seed, n_train=n_train).train_examples
    tokenizer = load_tokenizer(base, trust_remote_code)
    rows = []
    for i, example in enumerate(examples):
        response = reference_response(example)
        n_tokens = len(encode_response(tokenizer, response)[0])
        rows.append({C.SAMPLE_ID: i, C.QUERY: example["input"], C.RESPONSE: response,
                     C.TARGET_WEIGHTS: np.ones(n_tokens, dtype=np.float32)})
    out_dir = Path(out_dir).resolve()
    run = RunDir(out_dir.parent / f"{out_dir.name}-sft")
    run.claim()
    job = TrainingJob.of(train, base, seed, str(run.root), train.max_length or SFT_DEFAULTS["max_length"], k=1.0,
                         trust_remote_code=trust_remote_code)
    outcome = train_adapter(ray.data.from_items(rows), job, storage_path=str(run.root / "ray"))
    checkpoint = copy_adapter(outcome, run.root / "checkpoint")
    card = {"kind": "sft", "base": base, "task": task, "train_examples": len(rows),
            "metrics": {k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float))}}
    return export_adapter(checkpoint, out_dir, base, card, trust_remote_code)
