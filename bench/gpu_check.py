"""The GPU check for large models, prepared to run once on a single-GPU machine that has torch,
transformers and peft (no Ray, DeepSpeed or vLLM):

    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out bench/results/gpu_check.json

On a random-weight model built from the shipped Llama-3.1-8B config (tests/assets/configs) in bf16:
1. the GPU's measured bf16 matmul peak (8192^3 products);
2. titok's one-copy scorer (``titok.excess.score_batch``: expert pass, then amateur pass under
   ``disable_adapter``): response tokens/s, achieved TFLOP/s and MFU against the measured peak;
3. one selective-loss training step (``titok.train.step.training_step``, LoRA r=8 on q/v, AdamW) at
   micro-batch x sequence, with and without gradient checkpointing: peak GPU memory against what
   ``titok plan`` predicts for one GPU (``zero_model_states`` + ``activation_bytes`` + ``logits_bytes``).
Writes one JSON file. ``--config``/``--device cpu`` with small sizes give a smoke run anywhere.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from titok.excess import score_batch  # noqa: E402
from titok.sequences import TrainingBatch  # noqa: E402
from titok.model_shape import model_shape  # noqa: E402
from titok.plan import activation_bytes, logits_bytes, zero_model_states  # noqa: E402
from titok.sequences import EncodedPair, collate  # noqa: E402
from titok.train.step import TorchEngine, attach_fresh_lora, enable_gradient_checkpointing, training_step  # noqa: E402

GIB = 1024**3


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, n: int, repeats: int = 10) -> float:
    """Measured bf16 matmul TFLOP/s (mean of ``repeats`` products after 3 warm-ups)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def random_pairs(count: int, prompt: int, response: int, vocab: int, seed: int = 0) -> list[EncodedPair]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (count, prompt + response), generator=g).tolist()
    return [EncodedPair(row[:prompt], row[prompt:], [(i, i + 1) for i in range(response)]) for row in ids]


def build(config_dir: str, device: str, layers: int | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval(), config


def scorer_check(model, config, device: str, sequences: int, prompt: int, response: int, batch: int, peak: float) -> dict:
    from peft import LoraConfig, get_peft_model

    expert = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pairs = random_pairs(sequences, prompt, response, config.vocab_size)
    score_batch(expert, pairs[:batch], pad_token_id=0)  # warm-up
    sync(device)
    start = time.perf_counter()
    for i in range(0, sequences, batch):
        score_batch(expert, pairs[i : i + batch], pad_token_id=0)
    sync(device)
    seconds = time.perf_counter() - start
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lora_" not in n)
    flops = 2 * 2 * non_embedding * sequences * (prompt + response)  # expert + amateur forward passes
    expert.unload()  # drop the LoRA again: the training check attaches its own
    return {"sequences": sequences, "prompt_tokens": prompt, "response_tokens": response, "batch": batch,
            "seconds": round(seconds, 3), "response_tokens_per_s": round(sequences * response / seconds, 1),
            "achieved_tflops": round(flops / seconds / 1e12, 2), "mfu_vs_measured_peak": round(flops / seconds / 1e12 / peak, 3),
            "flops_formula": "2 passes x 2 x non-embedding params x tokens"}


def train_check(config_dir: str, device: str, layers: int | None, micro: int, seq: int, response: int,
                checkpointing: bool) -> dict:
    model, config = build(config_dir, device, layers)
    model = attach_fresh_lora(model, rank=8, alpha=8, target_modules=("q_proj", "v_proj"), dropout=0.0)
    if checkpointing:
        enable_gradient_checkpointing(model)
    engine = TorchEngine(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4), 0.3)
    pairs = random_pairs(micro, seq - response, response, config.vocab_size, seed=1)
    base = collate(pairs, 0, "right")
    batch = TrainingBatch(base.input_ids, base.attention_mask, base.position_ids, base.response_mask,
                          base.response_mask.float()).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [training_step(engine, batch) for _ in range(2)]  # the second step holds AdamW's states too
    sync(device)
    seconds = (time.perf_counter() - start) / 2
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    shape = model_shape(config_dir)
    if layers:  # the plan for the same truncated model
        from dataclasses import replace

        per_layer = shape.layer_params
        shape = replace(shape, layers=layers, params=shape.params - (shape.layers - layers) * per_layer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    states, _ = zero_model_states(shape.params, trainable, shape.largest_module_params, 1, 1, stage=2)
    predicted = {"model states": states, "activations": activation_bytes(shape, micro, seq, 2, checkpointing),
                 "logits": logits_bytes(shape, micro, response)}
    total = sum(predicted.values())
    del engine, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"micro_batch": micro, "sequence": seq, "response_tokens": response, "gradient_checkpointing": checkpointing,
            "losses": [round(x, 4) for x in losses], "step_seconds": round(seconds, 3),
            "peak_gib": round(peak / GIB, 2) if peak else None,
            "plan_gib": {k: round(v / GIB, 2) for k, v in predicted.items()}, "plan_total_gib": round(total / GIB, 2),
            "measured_over_plan": round(peak / total, 3) if peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "tests" / "assets" / "configs" / "llama-3.1-8b-instruct"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, help="truncate the model to this many decoder layers (smoke runs)")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--response", type=int, default=384)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--matmul", type=int, default=8192)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check.json"))
    args = parser.parse_args()

    result = {"machine": {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
                          "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "model": {"config": str(Path(args.config).relative_to(REPO)) if Path(args.config).is_relative_to(REPO) else args.config,
                        "layers": args.layers or "all", "dtype": "bfloat16", "weights": "random"}}
    peak = matmul_peak(args.device, args.matmul)
    result["matmul_bf16_tflops"] = round(peak, 1)
    print(f"bf16 matmul peak: {peak:.1f} TFLOP/s", flush=True)
    model, config = build(args.config, args.device, args.layers)
    result["model"]["params"] = sum(p.numel() for p in model.parameters())
    result["scorer"] = scorer_check(model, config, args.device, args.sequences, args.prompt, args.response, args.batch, peak)
    print("scorer:", result["scorer"], flush=True)
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    response = args.response if args.response < args.seq else args.seq // 2
    result["train_step"] = [train_check(args.config, args.device, args.layers, args.micro, args.seq, response, ckpt)
                            for ckpt in (True, False)]
    for row in result["train_step"]:
        print("train step:", row, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
