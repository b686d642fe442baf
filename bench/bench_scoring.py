"""Scoring: titok against the official release's scoring shape, same pairs, same run.

    python bench/bench_scoring.py --out bench/results/scoring.json

Real SmolLM2-135M-Instruct with a random non-trivial LoRA. The expert first answers the queries
(greedy, titok's labels stage), which gives both the (query, answer) pairs every variant scores and
titok's expert log-probs from generation. Then, per dtype:
- ``official``: the release's shape, two full model copies (expert and amateur), batches of 4,
  logits and a full-vocabulary fp32 log-softmax at every position;
- ``titok``: what titok's scores stage runs, one copy, the amateur pass only (the expert's log-probs
  came with generation; answers that do not re-tokenize to their own tokens are rescored with both
  passes), logits only where they predict an answer token, length-sorted token-budget batches;
- ``titok_two_pass``: titok's scorer asked for both passes (what it costs without the labels' help);
- ``titok_two_pass_mixed``: the same two passes as one forward, PEFT choosing the adapter per row
  (``mixed_batch``): measured to decide whether the scorer should fuse them.
Reported: response tokens/s, resident weight bytes, achieved GFLOP/s (2 x non-embedding parameters x
tokens run through the model, plus the LM head where logits are computed) against this machine's
measured matmul peak for the dtype, and ``ratio_vs_official_shape`` (titok / official, same dtype).
bf16 is measured only where the CPU runs it fast (``dtype: auto`` would pick it).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from titok.engines import GenerationParams, build_engine
from titok.core.excess import score_pairs
from titok.hardware import resolve_dtype
from titok.models import load_model, load_tokenizer
from titok.core.sequences import collate, encode_pair

TOPICS = ["the sea", "a mountain", "bread", "the moon", "a violin", "rain", "an old map", "a bicycle"]


def queries(n: int) -> list[str]:
    return [f"In two or three sentences, tell me about {TOPICS[i % len(TOPICS)]} (note {i})." for i in range(n)]


def matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def official_shape(expert, amateur, tokenizer, pairs_text, batch: int = 4) -> int:
    """Two copies, batches of 4 (right padding), logits everywhere, full fp32 log-softmax; returns
    the tokens run through each model."""
    tokens = 0
    with torch.no_grad():
        for start in range(0, len(pairs_text), batch):
            pairs = [encode_pair(tokenizer, q, r) for q, r in pairs_text[start : start + batch]]
            b = collate(pairs, tokenizer.pad_token_id, "right")
            tokens += int(b.attention_mask.sum())
            for model in (expert, amateur):
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, b.input_ids[:, 1:, None])
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs per variant (best kept)")
    parser.add_argument("--out", default="bench/results/scoring.json")
    args = parser.parse_args()

    base = "smollm2-135m"
    tokenizer = load_tokenizer(base)
    adapter = Path(args.out).parent / "bench-adapter"
    torch.manual_seed(0)
    get_peft_model(load_model(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False)).save_pretrained(adapter)
    asked = queries(args.pairs)
    labeller = build_engine("transformers", base, str(adapter), dtype="float32", batch_size=args.batch_size)
    labels = labeller.label(asked, GenerationParams(max_new_tokens=96, temperature=0.0))
    answers = [label.text for label in labels]
    known = [label.expert_logprobs for label in labels]
    del labeller
    pairs_text = list(zip(asked, answers))
    encoded = [encode_pair(tokenizer, q, a) for q, a in pairs_text]
    n_response = sum(len(p.response_ids) for p in encoded)
    rescored = [i for i, k in enumerate(known) if k is None]
    model = load_model(base)
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)  # the LM head is tied
    head = model.get_output_embeddings().weight.numel()
    del model

    def flops(pairs: list, passes: int, logits_everywhere: bool) -> float:
        """2 x body parameters per token through the model + 2 x LM head per position with logits."""
        tokens = sum(len(encoded[i].prompt_ids) + len(encoded[i].response_ids) for i in pairs)
        positions = tokens if logits_everywhere else sum(len(encoded[i].response_ids) + 1 for i in pairs)
        return passes * 2 * (body * tokens + head * positions)

    everything = list(range(len(encoded)))
    work = {"official": flops(everything, 2, True),
            "titok": flops(everything, 1, False) + flops(rescored, 1, False),
            "titok_two_pass": flops(everything, 2, False), "titok_two_pass_mixed": flops(everything, 2, False)}

    dtypes = [torch.float32]
    auto, reason = resolve_dtype("auto", use_gpu=False)
    if auto == "bfloat16":
        dtypes.append(torch.bfloat16)
    results = {}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        peak = matmul_peak(dtype)
        expert = PeftModel.from_pretrained(load_model(base, dtype=dtype), adapter).eval()
        amateur = load_model(base, dtype=dtype)
        weight_bytes = sum(p.numel() * p.element_size() for p in amateur.parameters())
        variants = {
            "official": (lambda: official_shape(expert, amateur, tokenizer, pairs_text), 2 * weight_bytes),
            "titok": (lambda: score_pairs(expert, tokenizer, asked, answers, args.batch_size,
                                          max_batch_tokens=args.max_batch_tokens, known_expert=list(known)), weight_bytes),
            "titok_two_pass": (lambda: score_pairs(expert, tokenizer, asked, answers, args.batch_size,
                                                   max_batch_tokens=args.max_batch_tokens), weight_bytes),
            "titok_two_pass_mixed": (lambda: score_pairs(expert, tokenizer, asked, answers, args.batch_size,
                                                         max_batch_tokens=args.max_batch_tokens, mixed_batch=True),
                                     weight_bytes),
        }
        best = {k: float("inf") for k in variants}
        for fn, _ in variants.values():
            fn()  # warm-up
        for _ in range(args.repeats):  # alternating, so a noisy moment hits every variant
            for key, (fn, _) in variants.items():
                start = time.perf_counter()
                fn()
                best[key] = min(best[key], time.perf_counter() - start)
        for key, (_, resident) in variants.items():
            achieved = work[key] / best[key] / 1e9
            results[f"{key}_{name}"] = {
                "seconds": round(best[key], 3), "response_tokens_per_s": round(n_response / best[key], 1),
                "resident_weight_bytes": resident, "gflop": round(work[key] / 1e9, 1), "achieved_gflops": round(achieved, 1),
                "matmul_peak_gflops": round(peak, 1), "mfu": round(achieved / peak, 3)}
            print(f"{key:20s} {name:9s} {best[key]:6.2f} s {n_response / best[key]:8.1f} tok/s  "
                  f"{achieved:6.1f} GFLOP/s of {peak:6.1f} peak", flush=True)
        expert = amateur = None  # free both copies before the next dtype
    fused = {name: round(results[f"titok_two_pass_{name}"]["seconds"] / results[f"titok_two_pass_mixed_{name}"]["seconds"], 2)
             for name in (str(d).removeprefix("torch.") for d in dtypes)}
    ratios = {name: round(results[f"official_{name}"]["seconds"] / results[f"titok_{name}"]["seconds"], 2)
              for name in (str(d).removeprefix("torch.") for d in dtypes)}
    report = {
        "benchmark": "contrastive excess scoring, titok vs the official release's shape",
        "machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "dtype_auto": [auto, reason]},
        "model": base, "pairs": args.pairs, "response_tokens": n_response,
        "prompt_tokens": sum(len(p.prompt_ids) for p in encoded), "answers_rescored_with_both_passes": len(rescored),
        "ratio_vs_official_shape": ratios, "mixed_batch_speedup_over_two_passes": fused, "target": "ratio >= 1.8 at equal dtype", "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"ratio_vs_official_shape {ratios}; wrote {args.out}")


if __name__ == "__main__":
    main()
