"""How many of a web_of_lies run's synthetic queries are puzzles of the task's own form, and how often the
expert answers those right, over the whole pool, TiTok's top-M and the rest (README "A second seed").

    python bench/web_of_lies_synthetic_answers.py runs/compare-paper-scale/runs/web_of_lies/seed1/gemma3-270m \
        --json bench/results/compare-paper-scale/web_of_lies-seed1/run.json

With ``--json`` it also writes the machine, the seconds of each stage the run dir recorded and the counts.

A query counts only if it parses as the generator writes it (``titok.tasks.web_of_lies``): "Question: A
lies. B says A tells the truth. ... Does E tell the truth?" (or "Does E lie?"); its answer is then determined.
The rule is ``titok.tasks.web_of_lies.solve``'s, applied by name: ``solve`` takes a chain in which each person
speaks of the one before, and a synthetic query may have anyone speak of anyone named earlier."""

from __future__ import annotations

import argparse
import json
import os
import re
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


def answer_token_kept(row) -> bool | None:
    """Whether the token filter kept the token of a response's final Yes/No (None: no final answer)."""
    found = list(re.finditer(r"answer is:?\s*(Yes|No)\b", row["response"]))
    if not found:
        return None
    start = found[-1].start(1)
    tokens = [i for i, (a, b) in enumerate(zip(row["offset_starts"], row["offset_ends"])) if a <= start < b]
    return bool(row["keep"][tokens[0]]) if tokens else None


def counts(run_dir: Path) -> dict:
    scores, kept = pd.read_parquet(run_dir / "scores"), pd.read_parquet(run_dir / "filter")
    scores["gold"], scores["answer"] = scores["query"].map(gold_answer), scores["response"].map(final_answer)
    in_top_m = scores["sample_id"].isin(set(kept["sample_id"]))
    out = {}
    for name, part in (("all", scores), ("top_m", scores[in_top_m]), ("rest", scores[~in_top_m])):
        solvable = part.dropna(subset=["gold"])
        out[name] = {"samples": len(part), "of_the_task_form": len(solvable),
                     "expert_right_on_those": int((solvable["answer"] == solvable["gold"]).sum()),
                     "expert_answers": {"Yes": int((part["answer"] == "Yes").sum()), "No": int((part["answer"] == "No").sum()),
                                        "none": int(part["answer"].isna().sum())}}
    answer_kept = [k for k in (answer_token_kept(r) for _, r in kept.iterrows()) if k is not None]
    out["top_m_answer_token_kept"] = {"kept": sum(answer_kept), "of": len(answer_kept)}
    return out


def stage_seconds(run_dir: Path) -> dict:
    """Each stage's seconds from its completion marker (train under a shared worker group: 0, see events)."""
    return {str(marker.parent.relative_to(run_dir)): json.loads(marker.read_text()).get("seconds")
            for marker in sorted(run_dir.rglob("_COMPLETE.json"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", type=Path, help="also write the counts, stage seconds and machine here")
    args = parser.parse_args()
    found = counts(args.run_dir)
    for name in ("all", "top_m", "rest"):
        c = found[name]
        print(f"{name}: {c['samples']} samples, {c['of_the_task_form']} of the task's form (expert right on "
              f"{c['expert_right_on_those']}); expert answers {c['expert_answers']}")
    print(f"top-M answer tokens kept by the token filter: {found['top_m_answer_token_kept']}")
    if args.json:
        import torch

        shared = [e for f in (args.run_dir / "events").glob("*.jsonl") for e in map(json.loads, f.read_text().splitlines())
                  if e.get("event") == "shared_pass"]
        record = {"machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
                              "torch": torch.__version__},
                  "run_dir": str(args.run_dir), "stage_seconds": stage_seconds(args.run_dir),
                  "shared_training_seconds": {",".join(e["adapters"]): e["seconds"] for e in shared},
                  "synthetic_data": found}
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
