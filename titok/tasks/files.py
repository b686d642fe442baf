"""Readers for task files: BBH JSON, BIG-bench task.json (multiple choice), MMLU CSV, LaMP-style JSON(L)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

__all__ = ["read_examples"]

_LETTERS = "ABCDEFGHIJ"


def _lettered(question: str, options: list[str]) -> str:
    return question.rstrip() + "\nOptions:\n" + "\n".join(f"({_LETTERS[i]}) {o}" for i, o in enumerate(options))


def _multiple_choice(raw: dict, rng: random.Random) -> dict:
    """BIG-bench ``target_scores``: options shuffled (sources often list the right one first)."""
    options = list(raw["target_scores"])
    rng.shuffle(options)
    best = max(options, key=lambda o: raw["target_scores"][o])
    return {"input": _lettered(raw["input"], options), "target": f"({_LETTERS[options.index(best)]})",
            "options": [f"({_LETTERS[i]})" for i in range(len(options))]}


def _read_mmlu_csv(path: Path) -> list[dict]:
    examples = []
    with path.open(newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if len(row) != 6 or row[5].strip().upper() not in ("A", "B", "C", "D"):
                raise ValueError(f"{path}:{line}: an MMLU row is question,A,B,C,D,answer-letter; got {row[:6]}")
            examples.append({"input": _lettered(row[0], row[1:5]), "target": f"({row[5].strip().upper()})",
                             "options": ["(A)", "(B)", "(C)", "(D)"]})
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
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected BBH format {{'examples': [{{'input': ..., 'target': ...}}]}}, "
                         "BIG-bench target_scores, or a list of {'input', 'output'} pairs")
    if all({"input", "output"} <= r.keys() for r in rows):  # LaMP-style generation
        return [{"input": str(r["input"]), "target": str(r["output"])} for r in rows], "rouge"
    if all({"input", "target_scores"} <= r.keys() for r in rows):
        return [_multiple_choice(r, rng) for r in rows], "accuracy"
    if all({"input", "target"} <= r.keys() for r in rows):
        return [{"input": str(r["input"]), "target": str(r["target"])} for r in rows], "accuracy"
    raise ValueError(f"{path}: expected BBH format {{'examples': [{{'input': ..., 'target': ...}}]}}, "
                     "BIG-bench target_scores, or a list of {'input', 'output'} pairs")
