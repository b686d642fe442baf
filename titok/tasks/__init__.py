"""Tasks: seed examples (few-shot prompts for query writing), training examples (for a source
adapter) and test examples, in BBH's ``{"input", "target"}`` form.

A task is a built-in procedural generator (exact answers, unlimited fresh examples) or a BBH-format
JSON file (``{"examples": [{"input": ..., "target": ...}]}``). Splits are seeded and disjoint.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from titok.tasks.arithmetic import make_multistep_arithmetic
from titok.tasks.boolean_expressions import make_boolean_expression
from titok.tasks.words import make_dyck, make_object_counting, make_word_sorting

__all__ = ["BUILTIN_TASKS", "Example", "Task", "load_task", "reference_response"]

Example = dict  # {"input": str, "target": str}

# BBH tasks whose examples a program generates: unlimited fresh examples with exact answers.
BUILTIN_TASKS = {
    "boolean_expressions": make_boolean_expression,
    "multistep_arithmetic_two": make_multistep_arithmetic,
    "word_sorting": make_word_sorting,
    "dyck_languages": make_dyck,
    "object_counting": make_object_counting,
}


@dataclass
class Task:
    name: str
    seed_examples: list[Example]
    train_examples: list[Example]
    test_examples: list[Example] = field(default_factory=list)


def reference_response(example: Example) -> str:
    """What a source adapter is trained to answer: the rationale (if any), then the answer."""
    if example.get("rationale"):
        return f"{example['rationale']} So the answer is {example['target']}."
    return example["target"]


def _split(examples: list[Example], n_seed: int, n_test: int, name: str) -> Task:
    if len(examples) < n_seed + 2:
        raise ValueError(f"task {name!r} has {len(examples)} examples; at least {n_seed + 2} are needed")
    n_test = min(n_test, (len(examples) - n_seed) // 2)
    return Task(name, examples[:n_seed], examples[n_seed + n_test :], examples[n_seed : n_seed + n_test])


def load_task(spec: str, seed: int = 0, n_seed: int = 8, n_train: int = 256, n_test: int = 200) -> Task:
    """A built-in task name or a BBH-format JSON path -> seeded, disjoint seed/train/test splits."""
    rng = random.Random(f"{spec}:{seed}")
    if spec in BUILTIN_TASKS:
        make, seen, examples = BUILTIN_TASKS[spec], set(), []
        attempts = 0
        while len(examples) < n_seed + n_train + n_test:
            attempts += 1
            if attempts > 100 * (n_seed + n_train + n_test):
                raise ValueError(f"task {spec!r} cannot produce {n_seed + n_train + n_test} distinct examples")
            example = make(rng)
            if example["input"] not in seen:
                seen.add(example["input"])
                examples.append(example)
        return _split(examples, n_seed, n_test, spec)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"task {spec!r} is neither a built-in task {sorted(BUILTIN_TASKS)} nor a file")
    data = json.loads(path.read_text())
    examples = data.get("examples") if isinstance(data, dict) else None
    if not examples or not all(isinstance(e, dict) and {"input", "target"} <= e.keys() for e in examples):
        raise ValueError(f"{path}: expected BBH format {{'examples': [{{'input': ..., 'target': ...}}]}}")
    examples = [{"input": str(e["input"]), "target": str(e["target"])} for e in examples]
    rng.shuffle(examples)
    return _split(examples, n_seed, n_test, path.stem)
