"""The one GPU check: what the 70B path needs from a GPU, on one GPU, in a few minutes, no network.

    bash bench/gpu_check_wheels.sh       # here, once: DeepSpeed and its small dependencies into .whl/
    # on the GPU machine (the device tool: carry .whl), from the repository root:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py          # writes bench/results/gpu_check.json
    python bench/gpu_check.py --dry-run                     # the same on CPU at toy size (CI runs this)

Each part runs titok's own code under the GPU's real rules and records its numbers, or its error
(the other parts still run; the exit status says whether all passed):
1. ``collectives``: an NCCL process group of world size 1; titok's collectives
   (``titok.train.collectives``, what the Ray Train loop calls every micro-step) on the loss's device,
   and a host tensor given to NCCL, which must be refused (the crash ``device_rules`` simulates on CPU).
2. ``zero3``: a random-weight model with Llama-3.3-70B's layer shapes truncated to 4 layers (5.5B
   parameters, 11 GB in bf16), saved as a model folder and loaded the way a job loads its target
   (``strategy.load_target``: built partitioned under ZeRO-3); LoRA r=8 on q/v in the dtype titok
   gives it; gradient checkpointing; 3 training steps of 2,048 tokens through ``training_step`` and
   DeepSpeed; peak GPU memory against ``titok plan``'s figure for the same shape and settings (the
   ratio); DeepSpeed's ``save_state``/``load_state`` round trip; the adapter saved and loaded onto a
   fresh base by stock PEFT.
3. ``scorer``: titok's one-copy scorer (``excess.score_batch``, expert then amateur pass) on a
   random-weight Llama-3.1-8B in bf16: tokens/s and MFU against the GPU's measured bf16 matmul peak.

What a bare GPU machine lacks (it has torch, transformers, peft, accelerate, pyarrow, numpy): DeepSpeed,
hjson, pydantic and pydantic's three small dependencies, all small wheels that travel in ``.whl/``
(``bench/gpu_check_wheels.sh``). Ray and vLLM are too large to carry, so nothing here imports them.
``--dry-run``: gloo instead of NCCL (with ``device_rules`` standing in for NCCL's refusal), CPU, toy
sizes of the same model shapes; CI runs it (tests/test_plan.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from titok.core.excess import score_batch  # noqa: E402
from titok.core.sequences import EncodedPair, TrainingBatch, collate  # noqa: E402

GIB = 1024**3
CONFIGS = REPO / "tests" / "assets" / "configs"
TOY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
       "vocab_size": 512}  # --dry-run: the same architectures, toy widths


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def model_config(name: str, layers: int | None, toy: bool):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(CONFIGS / name)
    if layers:
        config.num_hidden_layers = layers
    for key, value in (TOY.items() if toy else ()):
        setattr(config, key, value)
    return config


def random_pairs(count: int, prompt: int, response: int, vocab: int, seed: int = 0) -> list[EncodedPair]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (count, prompt + response), generator=g).tolist()
    return [EncodedPair(row[:prompt], row[prompt:], [(i, i + 1) for i in range(response)]) for row in ids]


def init_process_group(backend: str) -> None:
    """World size 1, as one Ray Train worker of many sees its own rank (LOCAL_RANK for DeepSpeed)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            **({"device_id": torch.device("cuda", 0)} if backend == "nccl" else {}))


# ---------------------------------------------------------------- 1. collectives

def collectives_check(device: str, dry_run: bool) -> dict:
    import torch.distributed as dist

    from titok.train import device_rules
    from titok.train.collectives import all_ranks_finite, mean_over_workers

    rules = device_rules.host_tensors_refused() if dry_run else nullcontext({})
    with rules as checked:
        layer = torch.nn.Linear(8, 1).to(device)
        loss = layer(torch.ones(2, 8, device=device)).pow(2).mean()
        finite = all_ranks_finite(loss)
        not_finite = all_ranks_finite(loss * float("nan"))
        mean = mean_over_workers(1.5, torch.device(device))
        try:  # what titok did before: a scalar made on the host
            dist.all_reduce(torch.tensor([1.0]))
            refused = None
        except Exception as err:  # noqa: BLE001 - NCCL's own error type varies by release
            refused = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    assert finite is True and not_finite is False and mean == 1.5, (finite, not_finite, mean)
    return {"backend": dist.get_backend(), "all_ranks_finite": [finite, not_finite], "mean_over_workers": mean,
            "host_tensor_refused": refused is not None, "refusal": refused,
            **({"simulated_by": "titok.train.device_rules", "checked": dict(checked)} if dry_run else {})}


# ---------------------------------------------------------------- 2. ZeRO-3 training

def _training_batch(micro: int, seq: int, response: int, vocab: int) -> TrainingBatch:
    base = collate(random_pairs(micro, seq - response, response, vocab, seed=1), 0, "right")
    return TrainingBatch(base.input_ids, base.attention_mask, base.position_ids, base.response_mask,
                         base.response_mask.float())


def _plan_train_gib(target_dir: str, micro: int, seq: int, response: int, gpu_gib: float | None) -> dict:
    """``titok plan``'s training memory per GPU for this shape and these settings (one worker)."""
    from titok.config import load_config
    from titok.workflows.plan import Resources, make_plan

    cfg = load_config(source_base=target_dir, source_adapter="unused", target_base=target_dir, task="boolean_expressions",
                      engine={"max_length": seq}, labels={"max_new_tokens": response - 1},
                      filter={"top_m": micro}, queries={"pool_size": micro},
                      train={"use_gpu": True, "workers": 1, "deepspeed_stage": 3, "dtype": "bfloat16",
                             "gradient_checkpointing": True, "micro_batch_size": micro, "global_batch_size": micro,
                             "max_length": seq, "lora": {"rank": 8, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}})
    stage = make_plan(cfg, Resources(nodes=1, gpus_per_node=1, gpu_memory_gib=gpu_gib, host_memory_gib=None)).stage("train")
    return {k: v / GIB for k, v in stage.gpu.items()}


def zero3_check(device: str, layers: int, micro: int, seq: int, response: int, steps: int, toy: bool, work: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from titok.train import strategy
    from titok.train.collectives import mean_over_workers
    from titok.train.step import attach_fresh_lora, enable_gradient_checkpointing, training_step

    seconds = {}
    config = model_config("llama-3.3-70b-instruct", layers, toy)
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    target = work / "target"
    model.save_pretrained(target)  # a model folder, loaded below exactly as a job loads its target
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    seconds["build_and_save"] = time.perf_counter() - started

    ds_config = strategy.deepspeed_config(3, micro, 1, 0.3, bf16=True)
    started = time.perf_counter()
    base, keep_alive = strategy.load_target(str(target), torch.bfloat16, ds_config)
    seconds["load_target"] = time.perf_counter() - started
    partitioned = all(hasattr(p, "ds_id") for p in base.parameters())
    model = attach_fresh_lora(base, rank=8, alpha=8, target_modules=("q_proj", "v_proj"), dropout=0.0)
    lora_dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if "lora_" in n})
    enable_gradient_checkpointing(model)
    engine = strategy.build_engine(model, ds_config, 1e-3, 0.0,
                                   lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    batch = _training_batch(micro, seq, response, config.vocab_size).to(engine.device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    losses = [mean_over_workers(training_step(engine, batch), engine.device) for _ in range(steps)]
    sync(device)
    seconds["per_step"] = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None

    strategy.save_state(engine, work / "state", {"step": steps})
    saved = strategy.lora_state_dict(model)
    training_step(engine, batch)  # moves the LoRA on
    moved = max((strategy.lora_state_dict(model)[k] - v).abs().max().item() for k, v in saved.items())
    restored_state = strategy.load_state(engine, work / "state")
    restored = strategy.lora_state_dict(model)
    round_trip = restored_state == {"step": steps} and all(torch.equal(restored[k], v) for k, v in saved.items())
    model.save_pretrained(work / "adapter", state_dict=saved, safe_serialization=True)

    engine.destroy()
    del engine, model, base, keep_alive
    if device == "cuda":
        torch.cuda.empty_cache()
    fresh = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16, device_map=device)
    peft = PeftModel.from_pretrained(fresh, str(work / "adapter"))
    loaded = {k.replace(".default", ""): v.detach().float().cpu() for k, v in peft.state_dict().items() if "lora_" in k}
    peft_ok = len(loaded) == len(saved) and all(torch.equal(loaded[k], saved[k].to(loaded[k].dtype))
                                                 for k in saved if k in loaded)
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if device == "cuda" else None
    plan = _plan_train_gib(str(target), micro, seq, response, gpu_gib)
    del peft, fresh
    if device == "cuda":
        torch.cuda.empty_cache()
    result = {"config": f"llama-3.3-70b-instruct, {layers} layers" + (" (toy widths)" if toy else ""), "params": params,
              "partitioned_at_load": partitioned, "lora_dtypes": lora_dtypes, "gradient_checkpointing": True,
              "micro_batch": micro, "sequence": seq, "response_tokens": response, "steps": steps,
              "losses": [round(x, 4) for x in losses], "losses_finite": all(x == x and abs(x) != float("inf") for x in losses),
              "seconds": {k: round(v, 3) for k, v in seconds.items()},
              "peak_gib": round(peak, 2) if peak is not None else None,
              "plan_gib": {k: float(f"{v:.4g}") for k, v in plan.items()}, "plan_total_gib": float(f"{sum(plan.values()):.4g}"),
              "measured_over_plan": round(peak / sum(plan.values()), 3) if peak is not None else None,
              "lora_moved_after_save": moved, "save_load_state_round_trip": round_trip, "stock_peft_loads_adapter": peft_ok}
    assert partitioned and result["losses_finite"] and moved > 0 and round_trip and peft_ok, result
    return result


# ---------------------------------------------------------------- 3. scorer

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


def scorer_check(device: str, toy: bool, sequences: int, prompt: int, response: int, batch: int, peak: float) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = model_config("llama-3.1-8b-instruct", 2 if toy else None, toy)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
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
    del expert, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"config": "llama-3.1-8b-instruct" + (", 2 layers (toy widths)" if toy else ""), "sequences": sequences,
            "prompt_tokens": prompt, "response_tokens": response, "batch": batch, "seconds": round(seconds, 3),
            "response_tokens_per_s": round(sequences * response / seconds, 1),
            "achieved_tflops": round(flops / seconds / 1e12, 3), "mfu_vs_measured_peak": round(flops / seconds / 1e12 / peak, 3),
            "flops_formula": "2 passes x 2 x non-embedding params x tokens"}


# ---------------------------------------------------------------- the run

def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "deepspeed", "pydantic"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _part(result: dict, name: str, run) -> None:
    started = time.perf_counter()
    try:
        result[name] = {"ok": True, **run()}
    except Exception as err:  # noqa: BLE001 - one part's failure is recorded, the others still run
        result[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                        "traceback": traceback.format_exc()[-4000:]}
    result[name]["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"{name}: {json.dumps(result[name])[:1500]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, gloo, toy widths: checks the script, not a GPU")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 70B-shaped model")
    parser.add_argument("--seq", type=int, default=2048, help="training sequence (tokens)")
    parser.add_argument("--micro", type=int, default=1, help="training micro-batch")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check.json"))
    args = parser.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run on a GPU machine, or --dry-run to check the script on CPU")
    device, backend = ("cpu", "gloo") if dry else ("cuda", "nccl")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if dry else "cuda")
    seq = 64 if dry else args.seq
    response = seq // 2

    result = {"dry_run": dry, "machine": {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda, "packages": _versions()}}
    peak = matmul_peak(device, 256 if dry else 8192)
    result["matmul_bf16_tflops"] = round(peak, 3 if dry else 1)
    init_process_group(backend)
    try:
        _part(result, "collectives", lambda: collectives_check(device, dry))
        with tempfile.TemporaryDirectory() as work:
            _part(result, "zero3", lambda: zero3_check(device, 2 if dry else args.layers, args.micro, seq, response,
                                                       3, dry, Path(work)))
        _part(result, "scorer", lambda: scorer_check(device, dry, 8 if dry else 64, 16 if dry else 128,
                                                     32 if dry else 384, 4 if dry else 16, peak))
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    failed = [name for name in ("collectives", "zero3", "scorer") if not result[name]["ok"]]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (see {args.out})")


if __name__ == "__main__":
    main()
