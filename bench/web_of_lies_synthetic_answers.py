"""How many of a web_of_lies run's synthetic queries are puzzles of the task's own form, and how often the
expert answers those right, over the whole pool, TiTok's top-M and the rest (README "A second seed").

    python bench/web_of_lies_synthetic_answers.py runs/compare-paper-scale/runs/web_of_lies/seed1/gemma3-270m

A query counts only if it parses as the generator writes it (``titok.tasks.web_of_lies``): "Question: A
lies. B says A tells the truth. ... Does E tell the truth?" (or "Does E lie?"); its answer is then determined."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd

_SAYS = r"(tells the truth|lies)"


def gold_answer(query: str) -> str | None:
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


def final_answer(response: str) -> str | None:
    found = re.findall(r"answer is:?\s*(Yes|No)\b", response)
    return found[-1] if found else None


def main(run_dir: str) -> None:
    scores, kept = pd.read_parquet(Path(run_dir) / "scores"), pd.read_parquet(Path(run_dir) / "filter")
    scores["gold"], scores["answer"] = scores["query"].map(gold_answer), scores["response"].map(final_answer)
    in_top_m = scores["sample_id"].isin(set(kept["sample_id"]))
    for name, part in (("all", scores), ("top-M", scores[in_top_m]), ("rest", scores[~in_top_m])):
        solvable = part.dropna(subset=["gold"])
        print(f"{name}: {len(part)} samples, {len(solvable)} of the task's form (expert right on "
              f"{int((solvable['answer'] == solvable['gold']).sum())}); expert answers Yes "
              f"{int((part['answer'] == 'Yes').sum())}, No {int((part['answer'] == 'No').sum())}, "
              f"none {int(part['answer'].isna().sum())}")


if __name__ == "__main__":
    main(sys.argv[1])
