"""How many of a run's synthetic queries are puzzles of the task's own form, and how often the expert
answers those right, over the whole pool, TiTok's top-M and the rest (README "A second seed", "tracking").

    python bench/synthetic_answers.py runs/compare-paper-scale/runs/web_of_lies/seed1/gemma3-270m \
        --json bench/results/compare-paper-scale/web_of_lies-seed1/run.json

The task comes from the run's ``config.yaml``. With ``--json`` it also writes the machine, the seconds of
each stage the run dir recorded and the counts.

A query counts only if it parses as the task's generator writes it and its answer is then determined:
- web_of_lies (``titok.tasks.web_of_lies``): "Question: A lies. B says A tells the truth. ... Does E tell
  the truth?" (or "Does E lie?"). The rule is ``web_of_lies.solve``'s, applied by name: ``solve`` takes a
  chain in which each person speaks of the one before, and a synthetic query may have anyone speak of
  anyone named earlier.
- boolean_expressions (``titok.tasks.boolean_expressions``): "not ( True ) and False is": True, False, not,
  and, or and balanced parentheses in Python's grammar, at least four tokens as the generator writes them
  (a bracket may touch its neighbour: "(False and True)"), then " is"; Python's parser (``ast``) checks the
  grammar. The rule is ``boolean_expressions.evaluate``'s (Python's precedence: not, and, or).
- tracking_shuffled_objects_three_objects (``titok.tasks.shuffled_objects``): three distinct players
  holding three distinct colours, any number of swaps between two different players named at the start
  ("First, ..., Then, ..., Next, ..., Finally, A and B swap balls"), then a last sentence ending "P has
  the" (however it opens) about a player named at the start, and exactly one option holding the colour
  that player ends with. The rule is
  ``shuffled_objects.swap_all``'s.
Hand-written for web_of_lies and tracking: no library parses those puzzles; the tests check each parser against the generator.

For boolean_expressions it also checks every step of the expert's rationales ("not False = True.", the
generator's form) and says how often the token filter kept a right step's result and a wrong one's."""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import yaml

from titok.tasks.boolean_expressions import evaluate
from titok.tasks.shuffled_objects import swap_all

_SAYS = r"(tells the truth|lies)"


def web_of_lies_gold(query: str) -> str | None:
    """The determined answer of a query of the task's exact form, else None."""
    m = re.fullmatch(r"Question: (.+?)\s+Does (\w+) (tell the truth|lie)\?", query.strip())
    if not m:
        return None
    sentences = [x.strip() for x in m.group(1).split(".") if x.strip()]
    first = re.fullmatch(rf"(\w+) {_SAYS}", sentences[0])
    if not first:
        return None
    truthful = {first.group(1): first.group(2) == "tells the truth"}
    for sentence in sentences[1:]:
        claim = re.fullmatch(rf"(\w+) says (\w+) {_SAYS}", sentence)
        if not claim or claim.group(2) not in truthful:
            return None
        truthful[claim.group(1)] = (claim.group(3) == "tells the truth") == truthful[claim.group(2)]
    if m.group(2) not in truthful:
        return None
    return "Yes" if truthful[m.group(2)] == (m.group(3) == "tell the truth") else "No"


_BOOLEAN_NODES = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not)


def _boolean_value(tokens: list[str]) -> bool | None:
    """The value of an expression of the task's words (Python's own parser checks the grammar: the task's
    expressions are Python's), else None."""
    try:
        tree = ast.parse(" ".join(tokens), mode="eval")
    except SyntaxError:
        return None
    grammatical = all(isinstance(node, _BOOLEAN_NODES) or (isinstance(node, ast.Constant) and isinstance(node.value, bool))
                      for node in ast.walk(tree))
    return evaluate(tokens) if grammatical else None


def _words(expression: str) -> list[str]:
    return re.sub(r"([()])", r" \1 ", expression).split()  # a bracket may touch its neighbour: "(False and True)"


def boolean_gold(query: str) -> str | None:
    """"True"/"False" for a grammatical expression of the generator's words ending " is", else None."""
    m = re.fullmatch(r"(.+?)\s+is", query.strip())
    if not m:
        return None
    tokens = _words(m.group(1))
    value = _boolean_value(tokens)
    return str(value) if value is not None and len(tokens) >= 4 else None


_STEP = re.compile(r"(?:^|(?<=\. ))(?P<expression>[^.=]+?) = (?P<result>True|False)\.")


def boolean_steps(response: str) -> list[tuple[int, bool]]:
    """(where its result starts, whether it is right) for each step of a rationale ("not False = True.",
    ``solve_steps``'s form) whose left side is an expression of the task's grammar."""
    steps = []
    for m in _STEP.finditer(response):
        value = _boolean_value(_words(m.group("expression")))
        if value is not None:
            steps.append((m.start("result"), str(value) == m.group("result")))
    return steps


_TRACKING = re.compile(
    r"(\w+), (\w+), and (\w+) are playing a game\. At the start of the game, they are each holding a ball: "
    r"(\w+) has an? (\w+) ball, (\w+) has an? (\w+) ball, and (\w+) has an? (\w+) ball\. "
    r"(?:As the game progresses, [^.]*\. )?(.+?)\. [^.\n]*?\b(\w+) has the\s*"
    r"Options:\s*((?:\([A-Z]\) [^\n]+\s*)+)", re.S)


def tracking_gold(query: str) -> str | None:
    """The option letter ``(X)`` of a well-posed three-player swap puzzle, else None."""
    m = _TRACKING.fullmatch(query.strip())
    if not m:
        return None
    players, holders = m.group(1, 2, 3), m.group(4, 6, 8)
    colors = m.group(5, 7, 9)
    if len(set(players)) != 3 or set(holders) != set(players) or len(set(colors)) != 3:
        return None
    swaps = []
    for step in re.split(r"\.\s+|,\s+and\s+(?=\w+, \w+ and)", m.group(10)):
        swap = re.fullmatch(r"(?i:first|then|next|after that|finally),? (\w+) and (\w+) swap balls", step.strip())
        if not swap or swap.group(1) == swap.group(2) or not set(swap.groups()) <= set(players):
            return None
        swaps.append(swap.groups())
    if not swaps or m.group(11) not in players:
        return None
    final = swap_all(dict(zip(holders, colors)), swaps)[-1][m.group(11)]
    options = re.findall(r"\(([A-Z])\) ([^\n]+)", m.group(12))
    right = [letter for letter, text in options if text.strip() == f"{final} ball"]
    return f"({right[0]})" if len(right) == 1 else None


@dataclass(frozen=True)
class Rules:
    gold: Callable[[str], str | None]
    answer: str  # the regex of the response's final answer: group 1 is the answer, group "key" its deciding token
    answers: tuple[str, ...]  # the answers counted by name in the report
    steps: Callable[[str], list[tuple[int, bool]]] | None = None  # a rationale's checkable steps, where the task has them


RULES = {
    "boolean_expressions": Rules(boolean_gold, r"answer is:?\s*(?P<key>True|False)\b", ("True", "False"),
                                 boolean_steps),
    "web_of_lies": Rules(web_of_lies_gold, r"answer is:?\s*(?P<key>Yes|No)\b", ("Yes", "No")),
    "tracking_shuffled_objects_three_objects": Rules(tracking_gold, r"answer is:?\s*(\((?P<key>[A-C])\))", ("(A)", "(B)", "(C)")),
}


def final_answer(rules: Rules, response: str) -> str | None:
    found = list(re.finditer(rules.answer, response))
    return found[-1].group(1) if found else None


def _token_at(row, char: int) -> int | None:
    """The index of the response token that holds character ``char``."""
    return next((i for i, (a, b) in enumerate(zip(row["offset_starts"], row["offset_ends"])) if a <= char < b), None)


def answer_token_kept(rules: Rules, row) -> bool | None:
    """Whether the token filter kept the token that decides a response's final answer (the letter of
    "(B)", not its bracket; None: no final answer)."""
    found = list(re.finditer(rules.answer, row["response"]))
    token = _token_at(row, found[-1].start("key")) if found else None
    return None if token is None else bool(row["keep"][token])


def step_results(scores: pd.DataFrame, kept: pd.DataFrame, steps: Callable[[str], list[tuple[int, bool]]]) -> dict:
    """The expert's right and wrong rationale steps: their result tokens' excess, and how often the token
    filter kept those tokens in top-M's samples. Says whether the token filter trains on the expert's
    reasoning or on its slips."""
    keep = dict(zip(kept["sample_id"], kept["keep"]))
    found = {True: [], False: []}  # right? -> (excess, kept by the token filter, None outside top-M)
    for _, row in scores.iterrows():
        mask = keep.get(row["sample_id"])
        for start, right in steps(row["response"]):
            token = _token_at(row, start)
            if token is not None:
                found[right].append((float(row["excess"][token]), None if mask is None else bool(mask[token])))
    out = {}
    for right, results in found.items():
        in_top_m = [k for _, k in results if k is not None]
        out["right" if right else "wrong"] = {
            "steps": len(results), "median_result_excess": float(np.median([e for e, _ in results])) if results else None,
            "in_top_m": len(in_top_m), "kept_by_token_filter": round(sum(in_top_m) / len(in_top_m), 3) if in_top_m else None}
    return out


def counts(run_dir: Path, rules: Rules) -> dict:
    scores, kept = pd.read_parquet(run_dir / "scores"), pd.read_parquet(run_dir / "filter")
    scores["gold"] = scores["query"].map(rules.gold)
    scores["answer"] = scores["response"].map(lambda r: final_answer(rules, r))
    in_top_m = scores["sample_id"].isin(set(kept["sample_id"]))
    out = {}
    for name, part in (("all", scores), ("top_m", scores[in_top_m]), ("rest", scores[~in_top_m])):
        solvable = part.dropna(subset=["gold"])
        out[name] = {"samples": len(part), "of_the_task_form": len(solvable),
                     "expert_right_on_those": int((solvable["answer"] == solvable["gold"]).sum()),
                     "expert_answers": {**{a: int((part["answer"] == a).sum()) for a in rules.answers},
                                        "none": int(part["answer"].isna().sum())}}
    answer_kept = [k for k in (answer_token_kept(rules, r) for _, r in kept.iterrows()) if k is not None]
    out["top_m_answer_token_kept"] = {"kept": sum(answer_kept), "of": len(answer_kept)}
    out["sample_score"] = what_the_sample_score_ranks(scores, in_top_m)
    if rules.steps:
        out["step_results"] = step_results(scores, kept, rules.steps)
    return out


def what_the_sample_score_ranks(scores: pd.DataFrame, in_top_m: pd.Series) -> dict:
    """What top-M by mean excess selects for: puzzles of the task's form, right answers, or short responses.
    A token's excess falls with its position (the amateur picks the pattern up from the response before
    it), so the mean ranks a short response high whatever it answers."""
    score, form = scores["sample_score"], scores["gold"].notna()
    right = form & (scores["answer"] == scores["gold"])
    return {"median": {"of_the_task_form": float(score[form].median()),
                       "not_of_the_task_form": float(score[~form].median()),
                       "expert_right": float(score[right].median()),
                       "expert_wrong": float(score[form & ~right].median())},
            "spearman_with_response_tokens": float(score.corr(scores["n_tokens"], method="spearman")),
            "of_the_task_form_in_top_m": {"found": int((form & in_top_m).sum()),
                                          "at_random": round(float(form.sum() * in_top_m.mean()), 1)}}


def stage_seconds(run_dir: Path) -> dict:
    """Each stage's seconds from its completion marker (train under a shared worker group: 0, see events)."""
    return {str(marker.parent.relative_to(run_dir)): json.loads(marker.read_text()).get("seconds")
            for marker in sorted(run_dir.rglob("_COMPLETE.json"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", type=Path, help="also write the counts, stage seconds and machine here")
    args = parser.parse_args()
    task = yaml.safe_load((args.run_dir / "config.yaml").read_text())["task"]
    if task not in RULES:
        raise SystemExit(f"{args.run_dir / 'config.yaml'}: task {task!r} has no parser here (one of {', '.join(RULES)})")
    found = counts(args.run_dir, RULES[task])
    for name in ("all", "top_m", "rest"):
        c = found[name]
        print(f"{name}: {c['samples']} samples, {c['of_the_task_form']} of the task's form (expert right on "
              f"{c['expert_right_on_those']}); expert answers {c['expert_answers']}")
    print(f"top-M answer tokens kept by the token filter: {found['top_m_answer_token_kept']}")
    print(f"the sample score (mean excess): {found['sample_score']}")
    if "step_results" in found:
        print(f"the expert's rationale steps, right and wrong: {found['step_results']}")
    if args.json:
        import torch

        shared = [e for f in (args.run_dir / "events").glob("*.jsonl") for e in map(json.loads, f.read_text().splitlines())
                  if e.get("event") == "shared_pass"]
        record = {"machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
                              "torch": torch.__version__},
                  "run_dir": str(args.run_dir), "task": task, "stage_seconds": stage_seconds(args.run_dir),
                  "shared_training_seconds": {",".join(e["adapters"]): e["seconds"] for e in shared},
                  "synthetic_data": found}
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
