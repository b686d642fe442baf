"""Readers for task files (BBH JSON, BIG-bench task.json multiple choice, MMLU CSV, LaMP-style
JSON(L)) and for datasets on the Hugging Face hub (``hf:ID[:CONFIG]``; needs network, or a local
dataset folder in place of ID). Rows are recognised by their fields, whatever their source."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

__all__ = ["LETTERS", "examples_from_rows", "lettered", "option_labels", "read_examples", "read_hub_dataset"]

LETTERS = "ABCDEFGHIJ"


def option_labels(n: int) -> list[str]:
    """The answer set of an n-option question: ``(A)``, ``(B)``, ..."""
    return [f"({LETTERS[i]})" for i in range(n)]


def lettered(question: str, options: list[str]) -> str:
    return question.rstrip() + "\nOptions:\n" + "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


def _multiple_choice(raw: dict, rng: random.Random) -> dict:
    """BIG-bench ``target_scores``: options shuffled (sources often list the right one first)."""
    if not isinstance(raw["target_scores"], dict) or not raw["target_scores"]:
        raise ValueError(f"BIG-bench 'target_scores' must be a non-empty mapping option -> score, got "
                         f"{type(raw['target_scores']).__name__} {str(raw['target_scores'])[:60]}")
    options = list(raw["target_scores"])
    rng.shuffle(options)
    best = max(options, key=lambda o: raw["target_scores"][o])
    return {"input": lettered(raw["input"], options), "target": f"({LETTERS[options.index(best)]})",
            "options": option_labels(len(options))}


def _read_mmlu_csv(path: Path) -> list[dict]:
    examples = []
    with path.open(newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if len(row) != 6 or row[5].strip().upper() not in ("A", "B", "C", "D"):
                raise ValueError(f"{path}:{line}: an MMLU row is question,A,B,C,D,answer-letter; got {row[:6]}")
            examples.append({"input": lettered(row[0], row[1:5]), "target": f"({row[5].strip().upper()})",
                             "options": option_labels(4)})
    return examples


def read_examples(path: Path, rng: random.Random) -> tuple[list[dict], str]:
    """(examples, metric) from a task file; the format is told by extension and fields."""
    if path.suffix == ".csv":
        return _read_mmlu_csv(path), "accuracy"
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        data = json.loads(path.read_text())
        rows = data.get("examples") if isinstance(data, dict) else data
    return examples_from_rows(rows, str(path), rng)


_LAYOUTS = ("BBH {'input', 'target'}, BIG-bench {'input', 'target_scores'}, LaMP-style {'input', 'output'} "
            "or MMLU {'question', 'choices', 'answer'}")


def examples_from_rows(rows, source: str, rng: random.Random) -> tuple[list[dict], str]:
    """(examples, metric) from raw rows; every row must have the same layout."""
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{source}: expected a non-empty list of rows: {_LAYOUTS}")
    for i, row in enumerate(rows):
        for key in ("target", "output"):
            if key in row and row[key] is None:
                raise ValueError(f"{source}: row {i} has {key!r}: null")
    if all({"input", "output"} <= r.keys() for r in rows):  # LaMP-style generation
        return [{"input": str(r["input"]), "target": str(r["output"])} for r in rows], "rouge"
    if all({"input", "target_scores"} <= r.keys() for r in rows):
        try:
            return [_multiple_choice(r, rng) for r in rows], "accuracy"
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
    if all({"input", "target"} <= r.keys() for r in rows):
        return [{"input": str(r["input"]), "target": str(r["target"])} for r in rows], "accuracy"
    if all({"question", "choices", "answer"} <= r.keys() for r in rows):  # MMLU as the hub has it (cais/mmlu)
        return [{"input": lettered(r["question"], list(r["choices"])), "target": f"({LETTERS[int(r['answer'])]})",
                 "options": option_labels(len(r["choices"]))} for r in rows], "accuracy"
    raise ValueError(f"{source}: rows have fields {sorted(rows[0])}; expected {_LAYOUTS}")


def read_hub_dataset(spec: str, rng: random.Random) -> tuple[list[dict], str]:
    """``hf:ID[:CONFIG]`` -> (examples, metric), every split pooled (titok makes its own seeded splits)."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ValueError(f"task {spec!r}: hub datasets need the `datasets` package") from err
    name, _, config = spec.removeprefix("hf:").partition(":")
    try:
        splits = load_dataset(name, config or None)
    except Exception as err:  # no network, unknown id or config: say which
        raise ValueError(f"task {spec!r}: cannot load hub dataset {name!r}"
                         f"{f' (config {config!r})' if config else ''}: {err}") from None
    rows = [dict(row) for split in sorted(splits) for row in splits[split]]
    return examples_from_rows(rows, spec, rng)
