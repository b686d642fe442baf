"""Pool kept evaluations of several compare invocations into one table and one set of paired tests.

Every ``titok compare`` evaluates on one fixed held-out split (``split_seed``), and keeps each row's
per-example scores in ``<out_dir>/evals/<task>/<target>/seed<N>.json``. Seeds run in different
invocations (or a budget run in another ``out_dir``) therefore pair example by example: this reads those
files and writes the report's own tables and paired tests (``titok.workflows.report``) over all of them,
without recomputing any stage. (A compare over the pooled seeds would do the same, but only while every
run's chain of stages is still on disk.)

    python bench/pool_evaluations.py --task web_of_lies --target gemma3-270m \\
        --out bench/results/compare-paper-scale/web_of_lies-seeds1-2 \\
        1=runs/compare-paper-scale/evals/web_of_lies/gemma3-270m/seed1.json \\
        2=runs/compare-paper-scale/evals/web_of_lies/gemma3-270m/seed2.json \\
        "1=runs/compare-steps/evals/web_of_lies/gemma3-270m/seed1.json:titok=titok (58 steps)"

Each argument is ``SEED=FILE``, every variant of the file as a row of that seed (vanilla, one greedy run,
from the first file that has it), or ``SEED=FILE:VARIANT=ROW[,VARIANT=ROW]``, the named variants only,
under the row names given. ``--expert`` adds the source expert's row (``evals/<task>/source-expert.json``).
FILE may also be a report's ``rows.json`` (``titok.workflows.report.write_rows``), which outlives the
run folder: its rows of that seed on ``--task`` and ``--target`` are the variants, vanilla among them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from titok.layout import short_name  # noqa: E402
from titok.workflows.report import evaluation_row, markdown_tables, paired_markdown, paired_tests, read_rows  # noqa: E402


def parse_source(text: str) -> tuple[int, Path, dict[str, str] | None]:
    """``SEED=FILE[:VARIANT=ROW,...]`` -> (seed, file, {variant: row name} or None for every variant)."""
    seed, sep, rest = text.partition("=")
    if not sep or not seed.isdigit():
        raise SystemExit(f"{text!r}: expected SEED=FILE[:VARIANT=ROW,...]")
    path, _, renames = rest.partition(":")
    names = None
    if renames:
        names = dict(pair.split("=", 1) for pair in renames.split(","))
    if not Path(path).is_file():
        raise SystemExit(f"{path}: no such evaluation file")
    return int(seed), Path(path), names


def _reports(path: Path, seed: int, task: str, target: str) -> dict[str, dict]:
    """Variant -> report of an evaluation file, or of a report's rows.json (its rows of ``seed``, and the
    untrained vanilla row)."""
    kept = json.loads(path.read_text())
    if "reports" in kept:
        return kept["reports"]
    return {row["method"]: row for row in read_rows(path)
            if (row["task"], row["target"]) == (task, target) and row["seed"] in (seed, "")}


def pooled_rows(sources: list[tuple[int, Path, dict[str, str] | None]], task: str, target: str) -> list[dict]:
    rows, have_vanilla = [], False
    for seed, path, names in sources:
        reports = _reports(path, seed, task, target)
        wanted = names or {variant: variant for variant in reports}
        for variant, name in wanted.items():
            if variant not in reports:
                raise SystemExit(f"{path}: no variant {variant!r} (it has {sorted(reports)})")
            if variant == "vanilla":
                if have_vanilla:
                    continue
                have_vanilla = True
            rows.append(evaluation_row(reports[variant], task, target, name, None if variant == "vanilla" else seed))
    return rows


def expert_row(path: Path, task: str) -> dict:
    """The source expert's row from its evaluation file (``evals/<task>/source-expert.json``) or a report's
    rows.json, under the source base's name as a compare report names it."""
    kept = json.loads(path.read_text())
    if "reports" in kept:
        return evaluation_row(kept["reports"]["expert"], task, short_name(kept["key"]["base"]), "source expert", None)
    expert = next(row for row in read_rows(path) if (row["task"], row["method"]) == (task, "source expert"))
    return evaluation_row(expert, task, expert["target"], "source expert", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", help="SEED=FILE[:VARIANT=ROW,...]")
    parser.add_argument("--task", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--expert", help="the source expert's evaluation file, or a report's rows.json (its row, untrained)")
    parser.add_argument("--out", required=True, help="folder for results.md and paired_tests.json")
    args = parser.parse_args()

    sources = [parse_source(text) for text in args.sources]
    rows = pooled_rows(sources, args.task, args.target)
    if args.expert:
        rows.insert(0, expert_row(Path(args.expert), args.task))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["seed"] != ""))
    tests = paired_tests(rows, [args.task], methods, "exact_match")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paired_tests.json").write_text(json.dumps(tests, indent=2))
    seeds = sorted({r["seed"] for r in rows if r["seed"] != ""})
    listed = "\n".join(f"- seed {seed}: `{path}`" + (f" ({', '.join(f'{v} as {n}' for v, n in names.items())})" if names else "")
                       for seed, path, names in sources)
    text = (f"# Pooled evaluations: {args.task} on {args.target}, seeds {', '.join(map(str, seeds))}\n\n"
            f"Written by `bench/pool_evaluations.py` from kept evaluations (one fixed held-out split; no stage recomputed):\n\n"
            f"{listed}\n\n{markdown_tables(rows, [args.task], methods)}\n\n{paired_markdown(tests)}\n")
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
