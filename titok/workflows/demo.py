"""See contrastive excess work in a minute on CPU: ``titok demo-excess``.

Teaches SmolLM2-135M-Instruct a pirate voice with a small LoRA (the expert), lets the expert answer
new questions, then scores every response token by how much more the expert likes it than the same
base without the LoRA. The tokens the adapter taught (the pirate words) come out on top.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from peft import PeftModel

from titok.core.excess import score_pairs
from titok.core.sequences import build_training_batch
from titok.models import load_model, load_tokenizer
from titok.core.sequences import format_prompt
from titok.train.step import TorchEngine, attach_fresh_lora, training_step
from titok.runstate import ADAPTER_CONFIG

__all__ = ["run_excess_demo"]

PIRATE_EXAMPLES = [
    ("What is the capital of France?", "Arr, matey! The capital o' France be Paris, ye landlubber."),
    ("How many legs does a spider have?", "Arr, a spider be havin' eight legs, matey, same as me crew's rigging!"),
    ("What color is the sky?", "Arr, the sky be blue, matey, like the seven seas."),
    ("What is 3 + 4?", "Arr, 3 + 4 be 7, matey. Count yer doubloons!"),
    ("Who wrote Hamlet?", "Arr, 'twas Shakespeare who wrote Hamlet, ye scallywag."),
    ("What do bees make?", "Arr, bees be makin' honey, matey, sweeter than rum."),
    ("Name a large ocean.", "Arr, the Pacific be the largest o' the seas, matey."),
    ("What is water made of?", "Arr, water be hydrogen an' oxygen, matey. Drink it, ye scurvy dog."),
]
HELD_OUT_QUERIES = ["What is the tallest mountain?", "How many days are in a week?", "What do cows eat?"]


def _train_pirate_adapter(base_spec: str, out_dir: Path, steps: int) -> Path:
    tokenizer = load_tokenizer(base_spec)
    model = attach_fresh_lora(load_model(base_spec), rank=8, alpha=16, dropout=0.0,
                              target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    engine = TorchEngine(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3), max_grad_norm=1.0)
    queries, responses = zip(*PIRATE_EXAMPLES)
    weights = [[1.0] * len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]
    batch = build_training_batch(tokenizer, list(queries), list(responses), weights)
    for step in range(steps):
        loss = training_step(engine, batch)
        if step % 10 == 0 or step == steps - 1:
            print(f"  sft step {step:3d}  loss {loss:.3f}")
    model.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def _answer(expert: PeftModel, tokenizer, queries: list[str], max_new_tokens: int = 40) -> list[str]:
    answers = []
    for query in queries:
        ids = tokenizer(format_prompt(tokenizer, query), add_special_tokens=False, return_tensors="pt").input_ids
        out = expert.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def run_excess_demo(out_dir: str | Path = "runs/demo-excess", base_spec: str = "smollm2-135m", steps: int = 40) -> None:
    out_dir = Path(out_dir)
    adapter_dir = out_dir / "pirate-lora"
    if (adapter_dir / ADAPTER_CONFIG).is_file():
        print(f"reusing the pirate adapter in {adapter_dir}")
    else:
        print(f"training a pirate LoRA on {base_spec} ({len(PIRATE_EXAMPLES)} examples, {steps} steps)")
        _train_pirate_adapter(base_spec, adapter_dir, steps)
    tokenizer = load_tokenizer(base_spec)
    expert = PeftModel.from_pretrained(load_model(base_spec), adapter_dir).eval()
    responses = _answer(expert, tokenizer, HELD_OUT_QUERIES)
    scores = score_pairs(expert, tokenizer, HELD_OUT_QUERIES, responses)

    print("\nper-token excess S = log P_expert - log P_amateur, shown as [token|S]:")
    for query, response, scored in zip(HELD_OUT_QUERIES, responses, scores):
        print(f"\nQ: {query}\nA: {response}")
        pieces = [f"[{response[s:e]!s}|{x:+.1f}]" for (s, e), x in zip(scored.offsets, scored.excess)]
        print("   " + " ".join(pieces))
    flat = [
        (float(x), response[s:e])
        for response, scored in zip(responses, scores)
        for (s, e), x in zip(scored.offsets, scored.excess)
    ]
    flat.sort(key=lambda item: -item[0])
    print("\ntop 10 tokens by excess (what the adapter taught):")
    for value, text in flat[:10]:
        print(f"  {value:+6.2f}  {text!r}")
    sample_means = [float(np.mean(s.excess)) for s in scores]
    print("\nsample score (mean excess):", ", ".join(f"{m:+.2f}" for m in sample_means))
