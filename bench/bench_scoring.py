"""Scoring throughput: titok's one-copy batched scorer vs. the naive two-copy, one-at-a-time reference.

    python bench/bench_scoring.py --pairs 32 --out bench/results/scoring.json

Same (query, response) pairs, same real SmolLM2-135M-Instruct and the same random non-trivial LoRA
for every variant; response tokens per second of wall time (expert + amateur both counted once).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from titok.excess import score_pairs
from titok.models import load_model, load_tokenizer
from titok.sequences import encode_pair

WORDS = "the sea is vast and deep and sailors have crossed it for ages under stars and storms".split()


def make_pairs(n: int) -> tuple[list[str], list[str]]:
    queries, responses = [], []
    for i in range(n):
        length = 20 + (i * 37) % 80
        queries.append(f"Question {i}: tell me about item {i}.")
        responses.append(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(length)))
    return queries, responses


def naive_two_copy(expert, amateur, tokenizer, queries, responses) -> None:
    with torch.no_grad():
        for q, r in zip(queries, responses):
            pair = encode_pair(tokenizer, q, r)
            ids = torch.tensor([pair.prompt_ids + pair.response_ids])
            for model in (expert, amateur):
                torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="bench/results/scoring.json")
    args = parser.parse_args()

    base = "smollm2-135m"
    tokenizer = load_tokenizer(base)
    queries, responses = make_pairs(args.pairs)
    n_tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses)
    adapter = Path(args.out).parent / "bench-adapter"
    torch.manual_seed(0)
    get_peft_model(load_model(base), LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(adapter)

    results = {}

    def timed(name, fn):
        fn_start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - fn_start
        results[name] = {"seconds": round(seconds, 3), "response_tokens_per_s": round(n_tokens / seconds, 1)}
        print(f"{name:32s} {seconds:7.2f} s  {n_tokens / seconds:8.1f} tok/s", flush=True)

    for dtype in (torch.float32, torch.bfloat16):
        expert = PeftModel.from_pretrained(load_model(base, dtype=dtype), adapter).eval()
        score_pairs(expert, tokenizer, queries[:2], responses[:2])  # warm-up
        timed(f"titok_one_copy_b{args.batch_size}_{str(dtype)[6:]}",
              lambda: score_pairs(expert, tokenizer, queries, responses, batch_size=args.batch_size))
        del expert
    amateur = load_model(base)
    expert = PeftModel.from_pretrained(load_model(base), adapter).eval()
    timed("naive_two_copy_b1_float32", lambda: naive_two_copy(expert, amateur, tokenizer, queries, responses))

    report = {
        "benchmark": "contrastive excess scoring",
        "model": base,
        "pairs": args.pairs,
        "response_tokens": n_tokens,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
