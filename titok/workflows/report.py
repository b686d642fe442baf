"""The ``titok compare`` report folder: what a person reads to decide whether a transplant is any good.

- ``results.md``: method x task tables (mean ± std over seeds) for exact match, option
  log-likelihood accuracy and ROUGE where they apply, the source expert and the majority rate as
  reference rows, and how to read them;
- ``results.csv``: one row per (task, target, method, seed), every metric;
- ``accuracy.png``: the exact-match table as bars, the error bars spanning the reported 95% interval;
- ``paired_tests.json``: the paired tests of ``results.md`` with their p-values;
- ``rows.json``: every row with its per-example scores, what the intervals and the paired tests read:
  a committed report pools with later ones (``bench/pool_evaluations.py``) after its run folder is gone;
- ``excess_histogram.png``: every synthetic sample's mean excess, with the top-M cut marked;
- ``tokens.html``: a few synthetic responses, every token shaded by its excess (green: the expert
  likes it more than the amateur, red: less) and the tokens TiTok trains on underlined.
"""

from __future__ import annotations

import csv
import html
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from titok import columns as C
from titok.choices import PAPER_METHOD
from titok.layout import budgets, equal_steps, row_label, row_method, run_config, short_name
from titok.core.metrics import UNANSWERED_SHARE, collapse_text, collapsed
from titok.core.stats import bootstrap_interval, paired_test, significant_from
from titok.runstate import COMPLETE

__all__ = ["REPORT_FILES", "ROWS_FILE", "accuracy_figure", "aggregate", "evaluation_row", "excess_figure", "markdown_tables",
           "read_rows", "shade_tokens", "write_compare_report", "write_rows"]

ROWS_FILE = "rows.json"
# what write_compare_report leaves in the report folder; results.md lists the others
REPORT_FILES = ("results.md", "results.csv", ROWS_FILE, "paired_tests.json", "accuracy.png", "excess_histogram.png",
                "tokens.html")

_METRICS = {"exact_match": "Exact match", "option_accuracy": "Option log-likelihood accuracy", "rougeL": "ROUGE-L"}
_REFERENCE_ROWS = ("source expert", "vanilla")


def evaluation_row(report: dict, task: str, target: str, method: str, seed: int | None) -> dict:
    """One row of the tables from one evaluation report (``evaluate``): its scores, its answer spread and
    its per-example scores (what the intervals and the paired tests read); ``seed`` None for an untrained row."""
    row = {"task": task, "target": target, "method": method, "seed": "" if seed is None else seed, "n": report["n"],
           "exact_match": report["exact_match"], "majority_rate": report["majority_rate"]}
    for name in ("option_accuracy", "rouge1", "rougeL", "top_prediction", "top_prediction_share", "answered_share"):
        if name in report:
            row[name] = report[name]
    row["per_example"] = report.get("per_example", {})
    return row


def _matrix(rows: list[dict], key: tuple, metric: str, seeds: set | None = None) -> np.ndarray | None:
    """(seeds, examples) per-example scores of one (task, target, method), seeds in order (only ``seeds``
    when given)."""
    task, target, method = key
    mine = sorted((r for r in rows if (r["task"], r["target"], r["method"]) == key and metric in r.get("per_example", {})
                   and (seeds is None or r["seed"] in seeds)), key=lambda r: str(r["seed"]))
    return np.array([r["per_example"][metric] for r in mine], dtype=np.float64) if mine else None


def _seeds(rows: list[dict], key: tuple) -> set:
    return {r["seed"] for r in rows if (r["task"], r["target"], r["method"]) == key}


def aggregate(rows: list[dict], metric: str) -> dict[tuple[str, str, str], tuple[float, float, float, int, int]]:
    """(task, target, method) -> (mean, 95% low, 95% high, seeds, examples). The interval is a
    bootstrap over examples and seeds (``titok.core.stats``) where per-example scores exist, else the
    mean ± the sample std over seeds."""
    values: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        if row.get(metric) is not None:
            values[(row["task"], row["target"], row["method"])].append(float(row[metric]))
    out = {}
    for key, v in values.items():
        matrix = _matrix(rows, key, metric)
        if matrix is not None:
            mean, low, high = bootstrap_interval(matrix)
            out[key] = (mean, low, high, matrix.shape[0], matrix.shape[1])
        else:
            std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
            out[key] = (float(np.mean(v)), float(np.mean(v)) - std, float(np.mean(v)) + std, len(v), 0)
    return out


def paired_tests(rows: list[dict], tasks: list[str], methods: list[str], metric: str) -> list[dict]:
    """Each TiTok row against every other trained row and vanilla, per task and target, on the same
    examples and the seeds both rows have (vanilla, one greedy run, is paired with every seed)."""
    tests = []
    for task in tasks:
        for target in dict.fromkeys(r["target"] for r in rows if r["task"] == task and r["method"] != "source expert"):
            for mine in (m for m in methods if row_method(m) == PAPER_METHOD):
                my_seeds = _seeds(rows, (task, target, mine))
                for other in ["vanilla", *(m for m in methods if m != mine)]:
                    # trained rows pair on the seeds both have; an untrained row (one greedy run) with every seed
                    theirs = _seeds(rows, (task, target, other))
                    untrained = theirs == {""}
                    seeds = my_seeds if untrained else my_seeds & theirs
                    a = _matrix(rows, (task, target, mine), metric, seeds)
                    b = _matrix(rows, (task, target, other), metric, None if untrained else seeds)
                    if a is None or b is None:
                        continue
                    if b.shape[0] == 1 and a.shape[0] > 1:
                        b = np.repeat(b, a.shape[0], axis=0)
                    if a.shape != b.shape:
                        continue
                    difference, p = paired_test(a, b)
                    resolves = significant_from(a, b)  # None: no difference could be called (JSON has no inf)
                    tests.append({"task": task, "target": target, "method": mine, "versus": other, "metric": metric,
                                  "difference": difference, "p": p, "significant": p < 0.05,
                                  "significant_from": None if np.isinf(resolves) else resolves, "n": int(a.size),
                                  "seeds": sorted(seeds, key=str)})
    return tests


def paired_markdown(tests: list[dict]) -> str:
    if not tests:
        return ""
    lines = ["### Paired tests (TiTok against each other row, same examples)", "",
             "| task | target | method | versus | metric | seeds | difference | p | | significant from |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in tests:
        resolves = "never" if t["significant_from"] is None else f"±{t['significant_from']:.3f}"
        lines.append(f"| {t['task']} | {short_name(t['target'])} | {t['method']} | {t['versus']} | {t['metric']} | "
                     f"{', '.join(map(str, t['seeds']))} | {t['difference']:+.3f} | {t['p']:.3f} | "
                     f"{'significant' if t['significant'] else 'n.s.'} | {resolves} |")
    lines += ["", "Two-sided sign-flip permutation test over examples (each example's difference averaged over "
                  "seeds); n.s.: p >= 0.05, the difference may be noise. Significant from: the smallest difference "
                  "the test would call with the examples on which the two rows disagree as they do (its critical "
                  "value): a smaller true effect, such as the paper's +0.007 to +0.022 BBH accuracy over KD (Table 1), cannot show "
                  "here; more examples or seeds lower it."]
    return "\n".join(lines)


def _table_rows(rows: list[dict], methods: list[str]) -> list[tuple[str, str]]:
    """(target, method) in reading order: the source expert, then per target vanilla and the methods."""
    order = [(r["target"], r["method"]) for r in rows if r["method"] == "source expert"][:1]
    for target in dict.fromkeys(r["target"] for r in rows if r["method"] != "source expert"):
        order += [(target, m) for m in ("vanilla", *methods) if any(r["target"] == target and r["method"] == m for r in rows)]
    return order


def _strictly_best(values: list[float]) -> float | None:
    """The highest value if it beats every other one (ties and lone values are not highlighted)."""
    ordered = sorted(values, reverse=True)
    return ordered[0] if len(ordered) > 1 and ordered[0] > ordered[1] else None


def markdown_tables(rows: list[dict], tasks: list[str], methods: list[str]) -> str:
    """One table per metric that any row has; the best trained method per target and task in bold."""
    sections = []
    for metric, title in _METRICS.items():
        metric_tasks = [t for t in tasks if any(r["task"] == t and r.get(metric) is not None for r in rows)]
        if not metric_tasks:
            continue
        stats = aggregate(rows, metric)
        trained = defaultdict(list)
        for (task, target, method), (mean, *_) in stats.items():
            if method not in _REFERENCE_ROWS:
                trained[(task, target)].append(mean)
        best = {key: _strictly_best(means) for key, means in trained.items()}
        collapses = {(r["task"], r["target"], r["method"]): r for r in rows if collapsed(r)}
        unanswered = {(r["task"], r["target"], r["method"]): r for r in rows
                      if metric == "exact_match" and r.get("answered_share", 1.0) < 1 - UNANSWERED_SHARE}
        lines = [f"### {title}", "", "| target | method | " + " | ".join(metric_tasks) + " |",
                 "|---|---|" + "---|" * len(metric_tasks)]
        for target, method in _table_rows(rows, methods):
            cells = []
            for task in metric_tasks:
                if (task, target, method) not in stats:
                    cells.append("")
                    continue
                mean, low, high, _, _ = stats[(task, target, method)]
                cell = f"{mean:.3f} [{low:.2f}, {high:.2f}]" if high > low else f"{mean:.3f}"
                bold = method not in _REFERENCE_ROWS and mean == best.get((task, target))
                cell = f"**{cell}**" if bold else cell
                cell += " †" if (task, target, method) in collapses else ""
                cells.append(cell + " ‡" if (task, target, method) in unanswered else cell)
            lines.append(f"| {short_name(target)} | {method} | " + " | ".join(cells) + " |")
        if metric != "rougeL":
            majority = {r["task"]: r["majority_rate"] for r in rows}
            lines.append("| | majority rate | " + " | ".join(f"{majority[t]:.3f}" for t in metric_tasks) + " |")
        notes = [f"† {short_name(target)} {method} on {task}{_seed_text(r)}: {collapse_text(r)}"
                 for (task, target, method), r in collapses.items() if task in metric_tasks]
        notes += [f"‡ {short_name(target)} {method} on {task}{_seed_text(r)}: an answer from the answer set on "
                  f"{round(r['answered_share'] * r['n'])} of {r['n']} examples; the others end without one (a loop, "
                  "or reasoning the token budget cut off)" for (task, target, method), r in unanswered.items()
                  if task in metric_tasks]
        sections.append("\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else [])))
    return "\n\n".join(sections)


_HOW_TO_READ = """\
### How to read it

- **vanilla** is the target base without an adapter; a transplant is only worth something where it
  beats vanilla *and* the majority rate (always answering the most common label).
- **kd** trains on every synthetic sample and token (hard labels from the expert): it is the
  baseline TiTok must beat. **uld** trains on the same data and also matches the expert's top-n
  next-token distributions across tokenizers (logit-level distillation): the field's strongest
  cross-tokenizer baseline. **random_m**, **top_m_only** and **top_k_only** take TiTok apart:
  M random samples; TiTok's sample filter alone; its token filter alone.
- **source expert** is the adapter being transplanted, on its own base: roughly the ceiling.
- Exact match is taken after answer extraction (the text after the last "the answer is", else the
  first line), so for small models it is partly a format test. Option log-likelihood accuracy picks
  the answer option with the highest mean log-prob per token: it needs no format, but it scores the
  answer right after the question, with no room for the step-by-step reasoning the adapters learn.
- † marks a row that gives one answer to at least 90% of the examples (where the gold answers are
  not that uniform): it has collapsed, whatever its accuracy; `results.csv` has every row's most
  common answer and its share.
- [low, high] is a 95% bootstrap interval over the held-out examples and the seeds; vanilla and the
  source expert use greedy decoding on one fixed test split, so they are one run each. The paired
  tests say which differences between TiTok and another row are more than noise (n.s.: they are not),
  and from what size on they could call one (significant from): a tie says nothing about an effect
  smaller than that; more held-out examples (`eval.examples`) or seeds lower it.
- `excess_histogram.png`: a wide spread with a clear upper tail means the excess separates what the
  adapter taught from what the base already knew; the top-M cut takes that tail.
- `tokens.html`: the shaded tokens are where the expert and the amateur disagree; if the underlined
  (trained) tokens are the answer-bearing ones, the token filter does what it should.
"""


def write_csv(rows: list[dict], path: Path) -> None:
    fields = ["task", "target", "method", "seed", "n", "exact_match", "option_accuracy", "rouge1", "rougeL", "majority_rate",
              "top_prediction", "top_prediction_share", "answered_share", "lr"]
    with open(path, "w", newline="") as f:
        # per-example scores stay out of the CSV (one row per run); the paired tests use them
        writer = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_rows(rows: list[dict], path: Path) -> None:
    """The rows with their per-example scores (``results.csv`` leaves those out)."""
    path.write_text(json.dumps({"rows": rows}))


def read_rows(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text())["rows"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_figure(rows: list[dict], tasks: list[str], methods: list[str]):
    """Exact match per target and method as bars; the error bar spans the reported 95% interval
    (mean - low below, high - mean above), so the figure and ``results.md`` show the same numbers."""
    plt = _pyplot()
    stats = aggregate(rows, "exact_match")
    targets = list(dict.fromkeys(r["target"] for r in rows if r["method"] != "source expert"))
    bars = ["vanilla", *methods]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks) + 1.5, 4), squeeze=False)
    width = 0.8 / len(bars)
    for ax, task in zip(axes[0], tasks):
        x = np.arange(len(targets))
        for i, method in enumerate(bars):
            found = [stats.get((task, t, method)) for t in targets]
            mean = [s[0] if s else np.nan for s in found]
            below = [s[0] - s[1] if s else 0.0 for s in found]
            above = [s[2] - s[0] if s else 0.0 for s in found]
            ax.bar(x + (i - (len(bars) - 1) / 2) * width, mean, width, yerr=[below, above], capsize=2, label=method)
        expert = [r["exact_match"] for r in rows if r["task"] == task and r["method"] == "source expert"]
        if expert:
            ax.axhline(expert[0], color="black", linestyle="--", linewidth=1, label="source expert")
        ax.axhline(next(r["majority_rate"] for r in rows if r["task"] == task), color="gray", linestyle=":",
                   linewidth=1, label="majority rate")
        ax.set_xticks(x, [short_name(t) for t in targets])
        ax.set_ylim(0, 1)
        ax.set_title(_wrapped(task), fontsize=10)
        ax.set_ylabel("exact match (bars: 95% interval)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def plot_accuracy(rows: list[dict], tasks: list[str], methods: list[str], path: Path) -> None:
    _save(accuracy_figure(rows, tasks, methods), path)


def _seed_text(row: dict) -> str:
    """A trained row's seed; vanilla and the expert are one greedy run, which no seed names."""
    return "" if row.get("seed") in (None, "") else f" (seed {row['seed']})"


def excess_figure(sample_scores: dict[str, np.ndarray], top_m: dict[str, int], seed: int = 0):
    """Every synthetic sample's score per task (the run of ``seed``), the top-M cut marked; the task on
    one title line and the counts on another, so long task names do not run into the next panel."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(sample_scores), figsize=(5 * len(sample_scores), 3.8), squeeze=False)
    for ax, (task, scores) in zip(axes[0], sample_scores.items()):
        scores = np.sort(scores[np.isfinite(scores)])[::-1]
        ax.hist(scores, bins=min(30, max(5, len(scores) // 2)), color="tab:blue", alpha=0.8)
        if len(scores) >= top_m[task]:
            ax.axvline(scores[top_m[task] - 1], color="tab:red", linestyle="--", label=f"top-M cut (M={top_m[task]})")
            ax.legend(fontsize=8)
        ax.set_title(f"{_wrapped(task)}\n{len(scores)} synthetic samples (seed {seed})", fontsize=9)
        ax.set_xlabel("sample score = mean excess (nats/token)")
        ax.set_ylabel("samples")
    fig.tight_layout()
    return fig


def plot_excess_histogram(sample_scores: dict[str, np.ndarray], top_m: dict[str, int], path: Path,
                          seed: int = 0) -> None:
    _save(excess_figure(sample_scores, top_m, seed), path)


def _wrapped(task: str, width: int = 28) -> str:
    """A task name (BBH names run to 40 characters, files to more) broken at underscores to fit a panel."""
    import textwrap

    name = Path(task).name
    return "\n".join(line.replace("_ ", "_") for line in textwrap.wrap(name.replace("_", "_ "), width))


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def shade_tokens(response: str, starts, ends, excess, keep, scale: float) -> str:
    """The response as HTML: one span per token, background by excess (alpha = |S| / scale, capped at
    1), underlined where ``keep`` (None: no token mask); the excess in each span's tooltip."""
    parts, position = [], 0
    for i, (start, end, score) in enumerate(zip(starts, ends, excess)):
        start, end = int(start), int(end)
        if start > position:
            parts.append(html.escape(response[position:start]))
        alpha = min(1.0, abs(float(score)) / scale) if scale > 0 else 0.0
        color = f"rgba(0,160,0,{alpha:.2f})" if score >= 0 else f"rgba(220,0,0,{alpha:.2f})"
        underline = "text-decoration:underline 2px;" if keep is not None and keep[i] else ""
        parts.append(f'<span style="background:{color};{underline}" title="{float(score):+.2f}">'
                     f"{html.escape(response[start:end]) or '&#8203;'}</span>")
        position = max(position, end)
    parts.append(html.escape(response[position:]))
    return "".join(parts)


def token_page(samples_by_task: dict[str, list[dict]]) -> str:
    """The HTML page: per task the top-scored samples (kept) and the lowest (dropped)."""
    body = []
    for task, samples in samples_by_task.items():
        magnitudes = np.concatenate([np.abs(s[C.EXCESS]) for s in samples if len(s[C.EXCESS])] or [np.zeros(1)])
        scale = float(np.percentile(magnitudes, 95)) or 1.0
        body.append(f"<h2>{html.escape(task)}</h2>")
        for s in samples:
            status = "kept (top-M)" if s["kept"] else "dropped"
            body.append(
                f'<div class="sample"><div class="meta">#{s["rank"]} of {s["pool"]} by mean excess '
                f"({s[C.SAMPLE_SCORE]:+.3f}), {status}</div><div class=\"query\">{html.escape(s[C.QUERY])}</div>"
                f'<div class="response">{shade_tokens(s[C.RESPONSE], s[C.OFFSET_STARTS], s[C.OFFSET_ENDS], s[C.EXCESS], s.get(C.KEEP), scale)}</div></div>')
    return (
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>titok: token excess</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto} .sample{margin:1.2em 0;padding:.6em;"
        "border:1px solid #ddd} .meta{color:#666;font-size:.85em} .query{font-family:monospace;margin:.3em 0}"
        ".response{font-family:monospace;white-space:pre-wrap;line-height:1.8}</style></head><body>"
        "<h1>Contrastive excess of the expert's synthetic responses</h1><p>Each token is shaded by "
        "S = log P<sub>expert</sub> − log P<sub>amateur</sub>: <span style=\"background:rgba(0,160,0,.8)\">green"
        "</span> the adapter made it likelier, <span style=\"background:rgba(220,0,0,.8)\">red</span> less likely "
        "(hover for the value). <u>Underlined</u> tokens are the top-k% TiTok trains on.</p>"
        + "".join(body) + "</body></html>"
    )


def _pool_samples(run_dir: Path, top_m: int, n_top: int = 3, n_bottom: int = 2) -> tuple[np.ndarray, list[dict]]:
    """Sample scores of the whole pool, and the top/bottom samples with TiTok's keep masks."""
    import pyarrow.parquet as pq

    pool = pq.read_table(run_dir / "scores").to_pylist()
    pool.sort(key=lambda r: (-r[C.SAMPLE_SCORE], r[C.SAMPLE_ID]))
    kept_masks = {}
    if (run_dir / "filter" / COMPLETE).is_file():
        kept_masks = {r[C.SAMPLE_ID]: r[C.KEEP] for r in pq.read_table(run_dir / "filter").to_pylist()}
    shown = []
    for rank, row in enumerate(pool, start=1):
        if rank <= n_top or rank > len(pool) - n_bottom:
            shown.append({**row, "rank": rank, "pool": len(pool), "kept": rank <= top_m,
                          C.KEEP: kept_masks.get(row[C.SAMPLE_ID])})
    return np.array([r[C.SAMPLE_SCORE] for r in pool], dtype=np.float64), shown


_SHORT_ANSWER_TOKENS = 4


def _short_answers_text(run_dirs: dict[str, Path], k: dict[str, float]) -> str:
    """Where the expert answers in a few tokens, what the token filter could select: little, so titok
    then differs from kd mostly in which samples it keeps."""
    import pyarrow.parquet as pq

    from titok.core.select import keep_count

    notes = []
    for task, run_dir in run_dirs.items():
        if not (run_dir / "scores" / COMPLETE).is_file():
            continue
        median = int(np.median(pq.read_table(run_dir / "scores", columns=[C.N_TOKENS]).column(C.N_TOKENS).to_numpy()))
        if median <= _SHORT_ANSWER_TOKENS:
            notes.append(f"On `{task}` the expert's answers are a median {median} token(s) long: the token filter "
                         f"(k = {k[task]}) keeps {keep_count(median, k[task])} of them, so titok differs from kd mostly "
                         "in which samples it keeps.")
    return "".join(note + "\n\n" for note in notes)


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split()).replace("`", "'")
    return text if len(text) <= width else text[: width - 1] + "…"


def _queries_text(run_dirs: dict[str, Path]) -> str:
    """Per task: how many synthetic queries were written, kept, and rejected by reason (off the seeds'
    shape, too similar), from the queries stage's ``queries_checked`` event."""
    from titok.runstate import RunDir

    lines = []
    for task, run_dir in run_dirs.items():
        checked = [e for e in RunDir(run_dir).events() if e.get("event") == "queries_checked"] if run_dir.is_dir() else []
        if checked:
            last = checked[-1]
            rejected = "; ".join(f"{n} {why}" for why, n in last["rejected"].items()) or "none"
            lines.append(f"- `{task}`: {last['kept']} kept of {last['written']} written; rejected: {rejected}")
            for why, queries in last.get("rejected_examples", {}).items():
                lines.append(f"  - {why}, e.g. " + " · ".join(f"`{_one_line(q, 100)}`" for q in queries[:2]))
    return ("Synthetic queries (the source model's, before labels):\n\n" + "\n".join(lines) + "\n\n") if lines else ""


def _learning_rates_text(trainings: dict[tuple, dict]) -> str:
    """Per trained row, the rate ``train.lr_search`` chose and every rate's final loss on the held-out
    synthetic samples (the test split is never read for it)."""
    from titok.core.validation_split import collapsed_answer_text

    searched = {key: t for key, t in trainings.items() if "lr_search" in t}
    if not searched:
        return ""
    rates = sorted({float(lr) for t in searched.values() for lr in t["lr_search"]})
    lines = ["Learning rate chosen per row on held-out synthetic samples (`train.lr_search`): the final validation "
             "loss on the kept tokens for each rate and the share of its held-out answers that end (`train."
             "validation_generations`), and the one answer they give where they collapse to it (>= 90% of them, "
             "where the expert's answers to the same queries are not); the lowest loss wins (bold) among the rates "
             "not ruled out (struck: their answers end on over 10 points fewer queries than another rate's, or "
             "collapse where another rate's do not); '-': diverged.\n",
             "| task | target | method | seed | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |",
             "|---|---|---|---|" + "---|" * len(rates)]
    for (task, target, method, seed), trained in searched.items():
        curves, chosen = trained["lr_search"], trained["metrics"]["lr"]
        ends, out = trained.get("lr_answers_end", {}), trained.get("lr_ruled_out", [])
        spreads = trained.get("lr_answers_spread", {})
        cells = []
        for lr in rates:
            curve, share, spread = curves.get(f"{lr:g}"), ends.get(f"{lr:g}"), spreads.get(f"{lr:g}")
            cell = "" if curve is None else f"{curve[-1]:.3f}" if curve else "-"
            cell += f", ends {share:.0%}" if curve and share is not None else ""
            cell += f", {collapsed_answer_text(spread)}" if curve and spread and spread["collapsed"] else ""
            cells.append(f"**{cell}**" if lr == chosen and cell else f"~~{cell}~~" if f"{lr:g}" in out else cell)
        lines.append(f"| {task} | {target} | {method} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


def _budget_text(cfg, run) -> str:
    epochs = f"{run.train.epochs} epoch(s) each"
    steps = f"{cfg.steps or equal_steps(run)} optimizer steps each"
    return {"epochs": epochs, "steps": steps, "both": f"{epochs}, and {steps} (rows marked (steps))"}[cfg.budget]


def _dotted(fields: dict, prefix: str = "") -> list[str]:
    return [item for key, value in fields.items()
            for item in (_dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}={value}"])]


def _per_task_text(cfg, shared_budget: str, task_budgets: dict[str, str]) -> str:
    """The tasks whose runs used other settings than the rest (``per_task``), so no one reads them as the same."""
    lines = [f"`{task}`: " + ", ".join(f"`{item}`" for item in _dotted(extra.fields()))
             + ("" if task_budgets[task] == shared_budget else f" (budget: {task_budgets[task]})")
             for task, extra in cfg.per_task.items() if extra.fields()]
    return "Settings for one task only (over the shared ones): " + "; ".join(lines) + ".\n\n" if lines else ""


def _seeds_text(seeds: list[int]) -> str:
    """How many seeds, and which where they are not 0..n-1 (an invocation that adds seeds)."""
    return f"{len(seeds)} seed(s)" + ("" if seeds == list(range(len(seeds))) else f" ({', '.join(map(str, seeds))})")


def write_compare_report(cfg, rows: list[dict], folder: Path, seconds: float,
                         trainings: dict[tuple, dict] | None = None) -> Path:
    """The report folder; ``trainings``: each trained row's train summary, by (task, target, method, seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    methods = [row_label(cfg, variant, budget) for budget in budgets(cfg) for variant in cfg.methods]
    write_csv(rows, folder / "results.csv")
    write_rows(rows, folder / ROWS_FILE)
    primary = {t: "rougeL" if any(r["task"] == t and "rougeL" in r.get("per_example", {}) for r in rows) else "exact_match"
               for t in cfg.tasks}
    tests = [test for task in cfg.tasks for test in paired_tests(rows, [task], methods, primary[task])]
    (folder / "paired_tests.json").write_text(json.dumps(tests, indent=2))
    plot_accuracy(rows, cfg.tasks, methods, folder / "accuracy.png")
    scores, samples, top_m, task_budgets, run_dirs, k = {}, {}, {}, {}, {}, {}
    for task in cfg.tasks:
        run = run_config(cfg, task, cfg.seed_list[0], cfg.targets[0], PAPER_METHOD, "<source>")
        top_m[task], task_budgets[task] = run.filter.top_m, _budget_text(cfg, run)
        run_dirs[task], k[task] = Path(run.run_dir), run.filter.k
        scores[task], samples[task] = _pool_samples(Path(run.run_dir), top_m[task])
    plot_excess_histogram(scores, top_m, folder / "excess_histogram.png", cfg.seed_list[0])
    # the header names the settings every task shares; per_task ones are listed after them
    run = run_config(cfg.model_copy(update={"per_task": {}}), cfg.tasks[0], cfg.seed_list[0], cfg.targets[0], PAPER_METHOD,
                     "<source>")
    budget = _budget_text(cfg, run)
    (folder / "tokens.html").write_text(token_page(samples))
    header = (
        f"# titok compare\n\nSource: `{cfg.source_base}` with one expert LoRA per task; targets: "
        + ", ".join(f"`{t}`" for t in cfg.targets)
        + f". {_seeds_text(cfg.seed_list)}; {rows[0]['n']} held-out examples per task (split seed {cfg.split_seed}, the same "
        f"for every row): a trained row rests on {rows[0]['n']} x {len(cfg.seed_list)} evaluations, vanilla and the expert on "
        f"{rows[0]['n']}. M = {run.filter.top_m}, k = {run.filter.k}, pool = {run.pool_size}; budget: {budget}. "
        f"Wall time of this invocation: {seconds / 60:.1f} min (finished runs and evaluations are reused).\n\n"
        + _per_task_text(cfg, budget, task_budgets) + _short_answers_text(run_dirs, k) + _queries_text(run_dirs)
        + _learning_rates_text(trainings or {}) + "Files: " + ", ".join(f"`{name}`" for name in REPORT_FILES if name != "results.md") + ".\n\n"
    )
    (folder / "results.md").write_text(header + markdown_tables(rows, cfg.tasks, methods) + "\n\n"
                                       + paired_markdown(tests) + "\n\n" + _HOW_TO_READ)
    return folder
