"""Would a one-standard-error rule pick another learning rate than the lowest validation loss?

``train.lr_search`` keeps every rate's LoRA (``<run dir>/[<method>/]lr-rates/<recipe>/lr<rate>``) and
picks the one with the lowest final validation loss on the held-out synthetic samples
(``titok.core.validation_split.best_lr``). That loss is a mean over a few dozen samples, so two rates can
differ by less than its noise. This re-scores each kept rate on the same held-out samples (the training's
own seeded draw, batches and loss), one sample at a time, and reports per rate:

- the token-weighted validation loss (it should match the training's recorded ``val_loss``);
- its paired difference to the argmin rate over the same samples, and that difference's standard error
  (a ratio estimator over samples: each sample weighs by its kept tokens);
- which rate the argmin picks and which the one-standard-error rule picks: the smallest rate whose
  difference to the argmin is within one standard error (the most conservative update the data cannot
  tell apart from the best);
- with ``--answers N``, the share of the first N held-out queries each rate's LoRA answers to the end
  (``titok.train.step.held_out_answers``, the training's own check; a rate kept from before the check
  has no ``val_answers_end`` recorded) and the rate ``best_lr`` picks with it.

    python bench/lr_rule.py runs/bool-lr/runs/boolean_expressions/seed0/gemma3-270m --methods kd titok uld \\
        --json bench/results/compare-paper-scale/boolean_expressions-lr-search/lr-rule-seed0.json

Written by hand: it reads titok's own run layout; no library scores kept LoRAs this way.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from titok import columns as C  # noqa: E402
from titok.core.sequences import build_training_batch  # noqa: E402
from titok.core.validation_split import best_lr, validation_mask  # noqa: E402
from titok.layout import stage_path  # noqa: E402
from titok.train.step import TorchEngine, held_out_answers, selective_loss  # noqa: E402


def one_se_lr(losses: dict[float, np.ndarray], weights: np.ndarray) -> tuple[float, dict[float, tuple[float, float]]]:
    """``(rate, {rate: (difference to the argmin, its standard error)})``: the smallest rate whose
    token-weighted loss is within one standard error of the argmin's, paired over the same samples."""
    means = {lr: float(np.sum(weights * v) / np.sum(weights)) for lr, v in losses.items()}
    best = min(means, key=lambda lr: (means[lr], lr))
    total, n = float(np.sum(weights)), len(weights)
    gaps = {}
    for lr, v in losses.items():
        d = v - losses[best]
        mean = float(np.sum(weights * d) / total)
        se = math.sqrt(n / (n - 1) * float(np.sum((weights * (d - mean)) ** 2))) / total if n > 1 else math.inf
        gaps[lr] = (mean, se)
    return min(lr for lr, (gap, se) in gaps.items() if gap <= se), gaps


def rate_folders(run_dir: Path, method: str) -> dict[float, Path]:
    root = run_dir / stage_path(method, "lr-rates")
    return {float(f.name[2:]): f for f in sorted(root.glob("*/lr*")) if (f / "adapter_model.safetensors").is_file()}


def per_sample_losses(base, adapter: Path, batches: list) -> np.ndarray:
    """The adapter's loss on each one-sample batch (``step.validation_loss``'s, sample by sample)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    losses = []
    with torch.no_grad():
        for batch in batches:
            losses.append(selective_loss(model, batch, "selected_mean").item())
    model.unload()
    return np.array(losses)


def answers_end(base, tokenizer, adapter: Path, held_out: list[dict], answers: int) -> float:
    """The share of the first ``answers`` held-out queries the adapter answers to the end (the training's check)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(adapter))
    rows = held_out[:answers]
    answers = held_out_answers(TorchEngine(model, None), tokenizer, [r[C.QUERY] for r in rows],
                               [len(r[C.TARGET_WEIGHTS]) for r in rows], batch_size=8)
    model.unload()
    return sum(ended for ended, _ in answers) / len(answers)


def main() -> None:
    from transformers import AutoModelForCausalLM

    from titok.models import load_tokenizer, resolve_model_path
    from titok.workflows.pipeline import teaching_rows

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a compare cell's run folder (runs/<task>/seed<N>/<target>)")
    parser.add_argument("--methods", nargs="+", default=["titok"])
    parser.add_argument("--target", default="gemma3-270m")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (the held-out draw's)")
    parser.add_argument("--fraction", type=float, default=0.1, help="train.validation_fraction")
    parser.add_argument("--max-length", type=int, default=320, help="the training's max_length")
    parser.add_argument("--answers", type=int, default=0, help="held-out queries each rate answers (0: none)")
    parser.add_argument("--json")
    args = parser.parse_args()

    started = time.perf_counter()
    tokenizer = load_tokenizer(args.target)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.target), dtype=torch.float32)  # CPU trains in fp32
    out = {"machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                       "processor": platform.processor() or platform.machine()}, "methods": {}}
    for method in args.methods:
        folders = rate_folders(args.run_dir, method)
        aligned = pq.read_table(str(args.run_dir / stage_path(method, "align")))
        rows = sorted(teaching_rows(aligned).to_pylist(), key=lambda r: r[C.SAMPLE_ID])  # as the workers read them
        held_out = [r for r, h in zip(rows, validation_mask(len(rows), args.fraction, args.seed)) if h]
        # a sample's weight in the token-weighted mean: its kept response tokens (as step.validation_loss counts them)
        batches = [build_training_batch(tokenizer, [r[C.QUERY]], [r[C.RESPONSE]], [r[C.TARGET_WEIGHTS]], args.max_length)
                   for r in held_out]
        weights = np.array([float((b.token_weights * b.response_mask)[:, 1:].sum()) for b in batches])
        losses = {lr: per_sample_losses(base, folder, batches) for lr, folder in folders.items()}
        recorded = {lr: json.loads((folder / "result.json").read_text())["metrics"].get("val_loss") for lr, folder in folders.items()}
        chosen, gaps = one_se_lr(losses, weights)
        result = {"held_out_samples": len(held_out), "argmin": best_lr({lr: [v] for lr, v in recorded.items() if v is not None}),
                  "one_se": chosen,
                  "rates": {f"{lr:g}": {"val_loss": float(np.sum(weights * v) / np.sum(weights)), "recorded_val_loss": recorded[lr],
                                        "minus_argmin": gaps[lr][0], "standard_error": gaps[lr][1]} for lr, v in losses.items()}}
        if args.answers:
            ends = {lr: answers_end(base, tokenizer, folder, held_out, args.answers) for lr, folder in folders.items()}
            result["answers_checked"] = min(args.answers, len(held_out))
            result["with_answers_end"] = best_lr({lr: [v] for lr, v in recorded.items() if v is not None}, ends)
            for lr, share in ends.items():
                result["rates"][f"{lr:g}"]["answers_end"] = share
        out["methods"][method] = result
        print(method, json.dumps(result, indent=1), flush=True)
    out["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
