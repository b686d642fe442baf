"""Tasks: seed examples (few-shot prompts for query writing), training examples (for a source
adapter) and test examples, as ``{"input", "target"}`` dicts (BBH's form).

A task is one of:
- a built-in procedural generator (unlimited fresh examples with exact answers): ``BUILTIN_TASKS``;
- a BBH-format JSON file ``{"examples": [{"input", "target"}]}``, or BIG-bench's ``task.json`` with
  ``target_scores`` (multiple choice; options shuffled, since BIG-bench often lists the right one first);
- an MMLU-style CSV (question, A, B, C, D, answer letter; the original header-less layout);
- a LaMP-style JSON/JSONL of ``{"input", "output"}`` pairs (free text, scored by ROUGE);
- a hub dataset, ``hf:ID[:CONFIG]`` (e.g. ``hf:lukaemon/bbh:boolean_expressions``,
  ``hf:cais/mmlu:anatomy``), with any of the layouts above; needs network and ``datasets``.
Splits are seeded and disjoint. Multiple-choice examples carry their ``options`` ((A), (B), ...);
``task.answer_set`` holds a task-wide closed answer set (True/False) when there is one. Both feed
option log-likelihood accuracy; ``task.metric`` says how to score.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from titok.tasks.arithmetic import make_multistep_arithmetic
from titok.tasks.boolean_expressions import make_boolean_expression
from titok.tasks.files import read_examples, read_hub_dataset
from titok.tasks.shuffled_objects import make_shuffled_objects
from titok.tasks.web_of_lies import make_web_of_lies
from titok.tasks.words import make_dyck, make_object_counting, make_word_sorting

__all__ = ["BUILTIN_TASKS", "Example", "Task", "load_task", "reference_response"]

Example = dict  # {"input": str, "target": str, optional "rationale": str, optional "options": list[str]}

# BBH tasks whose examples a program generates: unlimited fresh examples with exact answers.
BUILTIN_TASKS = {
    "boolean_expressions": make_boolean_expression,
    "multistep_arithmetic_two": make_multistep_arithmetic,
    "word_sorting": make_word_sorting,
    "dyck_languages": make_dyck,
    "object_counting": make_object_counting,
    "web_of_lies": make_web_of_lies,
    "tracking_shuffled_objects_three_objects": make_shuffled_objects,
}
# Built-in tasks with a closed answer set (option log-likelihood accuracy scores against it).
BUILTIN_ANSWER_SETS = {"boolean_expressions": ["True", "False"], "web_of_lies": ["Yes", "No"]}
_MAX_CLOSED_ANSWERS = 10  # a file task with at most this many distinct targets has a closed answer set


@dataclass
class Task:
    name: str
    seed_examples: list[Example]
    train_examples: list[Example]
    test_examples: list[Example] = field(default_factory=list)
    metric: str = "accuracy"  # "accuracy" (exact match, + option log-likelihood if closed) or "rouge"
    answer_set: list[str] | None = None


def reference_response(example: Example) -> str:
    """What a source adapter is trained to answer: the rationale (if any), then the answer."""
    if example.get("rationale"):
        return f"{example['rationale']} So the answer is {example['target']}."
    return example["target"]


def _split(examples: list[Example], n_seed: int, n_test: int, name: str, n_train: int | None = None, **kind) -> Task:
    if len(examples) < n_seed + 2:
        raise ValueError(f"task {name!r} has {len(examples)} examples; at least {n_seed + 2} are needed")
    n_test = min(n_test, (len(examples) - n_seed) // 2)
    train_end = None if n_train is None else n_seed + n_test + n_train
    return Task(name, examples[:n_seed], examples[n_seed + n_test : train_end], examples[n_seed : n_seed + n_test], **kind)


def _generate(spec: str, rng: random.Random, n_total: int) -> list[Example]:
    make, seen, examples = BUILTIN_TASKS[spec], set(), []
    for _ in range(100 * n_total):
        example = make(rng)
        if example["input"] not in seen:
            seen.add(example["input"])
            examples.append(example)
            if len(examples) == n_total:
                return examples
    raise ValueError(f"task {spec!r} cannot produce {n_total} distinct examples")


def _distinct(examples: list[Example], spec: str) -> list[Example]:
    """One example per input (a duplicated input would land in two splits and leak a test answer into
    training), with a real target and, where options are given, a non-empty set holding the target."""
    seen: dict[str, Example] = {}
    for i, example in enumerate(examples):
        target = example.get("target")
        if target is None or target == "None" or not str(target).strip():
            raise ValueError(f"task {spec!r}: example {i} has no target ({target!r})")
        if "options" in example and not example["options"]:
            raise ValueError(f"task {spec!r}: example {i} has an empty option set")
        previous = seen.setdefault(example["input"], example)
        if previous is not example and previous["target"] != example["target"]:
            raise ValueError(f"task {spec!r}: input {example['input'][:60]!r} appears twice with different targets "
                             f"({previous['target']!r}, {example['target']!r})")
    return list(seen.values())


# The held-out block: the examples after the seed ones that no training split reaches (``titok sft``
# trains on what follows it). An evaluation takes a prefix of it, so it can never score an example a
# source expert was trained on; more would reach into that training split.
HELD_OUT_EXAMPLES = 200


def load_task(spec: str, seed: int = 0, n_seed: int = 8, n_train: int = 256, n_test: int = HELD_OUT_EXAMPLES) -> Task:
    """A built-in task name or a task file -> seeded, disjoint seed/train/test splits (at most
    ``n_train`` training examples). A file's split is keyed by its content, not by how its path is
    spelled: ``task.json`` and ``/abs/task.json`` give the same split, so no test example of one run
    lands in another's training set."""
    if n_test > HELD_OUT_EXAMPLES:
        raise ValueError(f"task {spec!r}: {n_test} held-out examples asked for; the held-out split holds "
                         f"{HELD_OUT_EXAMPLES} (more would include examples a source expert trains on)")
    on_disk = spec not in BUILTIN_TASKS and not spec.startswith("hf:") and Path(spec).is_file()
    key = hashlib.sha256(Path(spec).read_bytes()).hexdigest() if on_disk else spec
    rng = random.Random(f"{key}:{seed}")
    if spec in BUILTIN_TASKS:
        examples = _generate(spec, rng, n_seed + n_train + n_test)
        return _split(examples, n_seed, n_test, spec, answer_set=BUILTIN_ANSWER_SETS.get(spec))
    path = Path(spec)
    if spec.startswith("hf:"):
        examples, metric = read_hub_dataset(spec, rng)
    elif path.is_file():
        try:
            examples, metric = read_examples(path, rng)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"task file {path} is not valid JSON: {err}") from None
    else:
        raise ValueError(f"task {spec!r} is neither a built-in task {sorted(BUILTIN_TASKS)}, a file nor hf:ID")
    examples = _distinct(examples, spec)
    rng.shuffle(examples)
    targets = sorted({e["target"] for e in examples})
    has_options = all("options" in e for e in examples)
    answer_set = targets if metric == "accuracy" and not has_options and len(targets) <= _MAX_CLOSED_ANSWERS else None
    name = spec.removeprefix("hf:").replace("/", "_").replace(":", "_") if spec.startswith("hf:") else path.stem
    return _split(examples, n_seed, n_test, name, n_train=n_train, metric=metric, answer_set=answer_set)
