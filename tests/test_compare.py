"""``titok compare``: config checks before compute, the report pieces on hand-made inputs, and one small
end-to-end run on local Ray with tiny models over the real SmolLM2 and Gemma-3 tokenizers."""

import csv
import json
import re

import numpy as np
import pytest

from titok.workflows.compare import load_compare_config, run_compare, short_name
from titok.config import ConfigError
from titok.runstate import RunDir
from titok.workflows.report import REPORT_FILES, aggregate, markdown_tables, shade_tokens

TINY_TRANSPLANT = {
    # two actors on the tests' 2-CPU Ray: every CPU held by the pool (a lazy read feeding it once hung)
    "engine": {"dtype": "float32", "actors": 2, "batch_size": 4, "max_length": 160},
    "queries": {"few_shot": 2, "pool_size": 8, "max_new_tokens": 16, "max_rounds": 3, "on_task": False},
    "labels": {"max_new_tokens": 16},
    "filter": {"top_m": 4, "k": 0.7},
    "train": {"workers": 1, "epochs": 1, "global_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3},
}


def _compare_yaml(tmp_path, dirs, **fields) -> str:
    import yaml

    data = {"source_base": dirs["source"], "targets": [dirs["source"], dirs["target"]],
            "tasks": ["boolean_expressions"], "methods": ["kd", "titok"], "seeds": 1,
            "out_dir": str(tmp_path / "compare"), "source": {"adapters": {"boolean_expressions": dirs["adapter"]}},
            "eval": {"examples": 4, "max_new_tokens": 8, "batch_size": 4, "dtype": "float32"},
            "transplant": TINY_TRANSPLANT, **fields}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("override, named", [
    ("transplant.filter.method=kd", "filter.method and filter.reference are set per run"),
    ("transplant.task=word_sorting", "set per run by compare"),
    ("methods=[titok, titok]", "listed twice"),
    ("methods=[titok, distill]", "'distill' is not a method"),
    ("methods=[titok, titok:nobody]", "'titok:nobody' is not a method"),
    ("tasks=[boolean_expressions, no_such_task]", "tasks: task 'no_such_task'"),
    ("source.adapters={object_counting: /nowhere}", "source.adapters: ['object_counting']"),
    ("transplant.filter.top_m=100", "top_m=100 is larger than queries.pool_size=8"),
    ("source.train={epochs: 0}", "source.train.epochs"),
    ("transplant.train.epochs=0", "transplant.train.epochs"),
    ("eval.examples=500", "eval.examples: Input should be less than or equal to 200"),  # past the held-out split
    ("transplant.engine.batch_sise=4", "transplant.engine.batch_sise"),
    ("per_task={word_sorting: {queries: {max_new_tokens: 96}}}", "per_task: ['word_sorting'] are not among tasks"),
    ("per_task={boolean_expressions: {run_dir: /tmp/x}}", "per_task: Value error, boolean_expressions: ['run_dir']"),
    ("per_task={boolean_expressions: {filter: {method: kd}}}", "filter.method and filter.reference are set per run"),
    ("per_task={boolean_expressions: {queries: {max_new_tokes: 96}}}", "per_task.boolean_expressions.queries.max_new_tokes"),
    ("per_task={boolean_expressions: {filter: {top_m: 100}}}", "top_m=100 is larger than queries.pool_size=8"),
])
def test_bad_compare_configs_are_named_before_any_compute(tmp_path, tiny_model_dirs, override, named):
    """Each refused with the field's path: a section's own fields when the file is read (typed), the
    combinations per run before anything computes."""
    path = _compare_yaml(tmp_path, tiny_model_dirs)
    with pytest.raises(ConfigError, match=re.escape(named)):
        from titok.workflows.compare import validate_compare

        validate_compare(load_compare_config(path, [override]))
    assert not (tmp_path / "compare").exists()


def test_the_steps_budget_gives_every_method_the_same_optimizer_steps(tmp_path, tiny_model_dirs):
    from titok.layout import run_config
    from titok.train.batching import train_plan

    cfg = load_compare_config(_compare_yaml(tmp_path, tiny_model_dirs, budget="both",
                                            methods=["kd", "random_m", "top_m_only", "top_k_only", "titok", "titok:both"]))
    runs = {(m, b): run_config(cfg, "boolean_expressions", 0, tiny_model_dirs["target"], m, "adapter", b)
            for m in cfg.methods for b in ("epochs", "steps")}
    # pool 8 / global batch 4 x 1 epoch: the methods on M samples are given kd's 2 steps; those on the
    # whole pool (kd, top_k_only) take them in their epoch, so their run is the epochs run, folder and
    # all (budget: both trains and evaluates it once)
    assert {m: runs[(m, "steps")].train.max_steps for m in cfg.methods} == {
        "kd": None, "random_m": 2, "top_m_only": 2, "top_k_only": None, "titok": 2, "titok:both": 2}
    assert train_plan(8, runs[("kd", "steps")].train, 1).total_steps == 2
    assert runs[("kd", "steps")] == runs[("kd", "epochs")] and runs[("top_k_only", "steps")] == runs[("top_k_only", "epochs")]
    assert {runs[(m, "epochs")].train.max_steps for m in cfg.methods} == {None}
    named = load_compare_config(_compare_yaml(tmp_path, tiny_model_dirs, budget="steps", steps=5))
    assert run_config(named, "boolean_expressions", 0, tiny_model_dirs["target"], "kd", "adapter", "steps").train.max_steps == 5
    assert runs[("titok", "epochs")].run_dir != runs[("titok", "steps")].run_dir  # both budgets kept side by side
    assert runs[("titok:both", "steps")].filter.reference == "both"


def test_equal_steps_are_the_steps_kd_trains_when_it_holds_samples_out_for_validation(tmp_path, tiny_model_dirs):
    """The paper-scale shape: kd trains on the pool less its validation hold-out (500 - 50 samples, 29
    steps of 16 an epoch), so the steps budget gives every method kd's 58 steps, not the 64 of the whole pool."""
    from titok.layout import run_config
    from titok.train.batching import train_plan

    cfg = load_compare_config(_compare_yaml(tmp_path, tiny_model_dirs, budget="both"), [
        "transplant.queries.pool_size=500", "transplant.filter.top_m=250", "transplant.train.epochs=2",
        "transplant.train.global_batch_size=16", "transplant.train.validation_fraction=0.1"])
    kd = run_config(cfg, "boolean_expressions", 0, tiny_model_dirs["target"], "kd", "adapter", "epochs")
    titok = run_config(cfg, "boolean_expressions", 0, tiny_model_dirs["target"], "titok", "adapter", "steps")
    assert titok.train.max_steps == train_plan(500, kd.train, kd.train.workers).total_steps == 58


def test_per_task_settings_change_only_their_tasks_runs(tmp_path, tiny_model_dirs):
    """A task's ``per_task`` fields go over ``transplant`` for its runs alone: the other task's runs keep
    their config and their stages' fingerprints (so adding one task's settings reuses the other's runs)."""
    from titok.layout import run_config
    from titok.workflows.pipeline import _stage_fields

    def runs(cfg):
        return {task: run_config(cfg, task, 0, tiny_model_dirs["target"], "titok", tiny_model_dirs["adapter"], "steps") for task in cfg.tasks}

    shared = runs(load_compare_config(_compare_yaml(tmp_path, tiny_model_dirs, budget="steps"),
                                      ["tasks=[boolean_expressions, web_of_lies]"]))
    per_task = runs(load_compare_config(_compare_yaml(tmp_path, tiny_model_dirs, budget="steps"), [
        "tasks=[boolean_expressions, web_of_lies]", "per_task={web_of_lies: {queries: {max_new_tokens: 40}}}"]))
    assert _stage_fields(per_task["boolean_expressions"]) == _stage_fields(shared["boolean_expressions"])
    wol, before = per_task["web_of_lies"], shared["web_of_lies"]
    assert (wol.queries.max_new_tokens, before.queries.max_new_tokens) == (40, 16)
    # the rest of the queries section, and every other section, stay the shared ones
    assert wol.queries.model_dump(exclude={"max_new_tokens"}) == before.queries.model_dump(exclude={"max_new_tokens"})
    assert wol.model_dump(exclude={"queries"}) == before.model_dump(exclude={"queries"})


def test_seeds_flag_overrides_the_config(tmp_path, tiny_model_dirs):
    assert load_compare_config(_compare_yaml(tmp_path, tiny_model_dirs), seeds=3).seed_list == [0, 1, 2]
    with pytest.raises(ConfigError, match="seeds"):
        load_compare_config(_compare_yaml(tmp_path, tiny_model_dirs), seeds=0)


@pytest.mark.parametrize("seeds, named", [("[]", "one or more seeds"), ("[1, -1]", "each >= 0"),
                                          ("[2, 2]", "listed twice"), ("one", "seeds")])
def test_a_seed_list_runs_those_seeds_and_bad_ones_are_named(tmp_path, tiny_model_dirs, seeds, named):
    """``seeds: [1, 2]`` adds seeds to an out_dir that has seed 0 (or shares seeds out between jobs)."""
    path = _compare_yaml(tmp_path, tiny_model_dirs)
    assert load_compare_config(path, ["seeds=[2, 1]"]).seed_list == [2, 1]
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_compare_config(path, [f"seeds={seeds}"])


def _rows(method, seeds, per_example, target="g"):
    return [{"task": "t", "target": target, "method": method, "seed": seed, "n": len(scores),
             "exact_match": float(np.mean(scores)), "majority_rate": 0.5, "per_example": {"exact_match": scores}}
            for seed, scores in zip(seeds, per_example)]


def test_aggregate_table_and_paired_tests_by_hand():
    from titok.workflows.report import paired_markdown, paired_tests

    rows = (_rows("titok", [0, 1], [[1, 0, 1, 0, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1, 1]])
            + _rows("kd", [0, 1], [[0, 0, 1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]])
            + _rows("vanilla", [""], [[1, 1, 1, 1, 1, 1, 1, 1]])
            + _rows("source expert", [""], [[1, 1, 1, 1, 1, 1, 1, 0]], target="s"))
    stats = aggregate(rows, "exact_match")
    mean, low, high, seeds, examples = stats[("t", "g", "titok")]
    assert (mean, seeds, examples) == (0.8125, 2, 8) and low < mean < high <= 1.0
    assert stats[("t", "g", "vanilla")][:3] == (1.0, 1.0, 1.0)  # no spread, no interval
    table = markdown_tables(rows, ["t"], ["kd", "titok"]).splitlines()
    body = [line for line in table if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[1] for line in body] == ["source expert", "vanilla", "kd", "titok", "majority rate"]
    assert body[1] == "| g | vanilla | 1.000 |"  # a reference row is never bold, even when it is the best
    assert re.fullmatch(r"\| g \| titok \| \*\*0\.812 \[0\.\d\d, 1\.00\]\*\* \|", body[3]), body[3]
    assert "Option log-likelihood" not in "\n".join(table)  # no row has that metric
    tests = {t["versus"]: t for t in paired_tests(rows, ["t"], ["kd", "titok"], "exact_match")}
    assert set(tests) == {"vanilla", "kd"}
    assert tests["kd"]["difference"] == pytest.approx(0.8125 - 0.125) and tests["kd"]["significant"]
    assert tests["vanilla"]["difference"] == pytest.approx(-0.1875) and not tests["vanilla"]["significant"]
    # what each comparison can resolve: against kd 6 examples differ (five by 1, one by 0.5), so only the
    # all-one-way pattern (5.5 / 8, p = 2/64) is called; against vanilla 2 differ, too few for any
    assert tests["kd"]["significant_from"] == pytest.approx(5.5 / 8) and tests["vanilla"]["significant_from"] is None
    lines = paired_markdown(list(tests.values())).splitlines()
    assert "| g | titok | kd | exact_match | 0, 1 | +0.688 | 0.031 | significant | ±0.688 |" in "\n".join(lines)
    assert "| g | titok | vanilla | exact_match | 0, 1 | -0.188 | 0.500 | n.s. | never |" in "\n".join(lines)

    # both budgets side by side: every TiTok row, "titok (epochs)" too, is paired with every other row
    both = [r | {"method": f"{r['method']} ({budget})"} for budget in ("epochs", "steps") for r in rows
            if r["method"] in ("kd", "titok")] + [r for r in rows if r["method"] not in ("kd", "titok")]
    labels = [f"{m} ({b})" for b in ("epochs", "steps") for m in ("kd", "titok")]
    pairs = {(t["method"], t["versus"]) for t in paired_tests(both, ["t"], labels, "exact_match")}
    assert pairs == {(f"titok ({b})", other) for b in ("epochs", "steps")
                     for other in ["vanilla", *(label for label in labels if label != f"titok ({b})")]}


def test_a_row_that_answers_one_label_to_everything_is_marked():
    from titok.core.metrics import answer_spread

    targets = ["True", "False"] * 4
    rows = (_rows("kd", [0], [[1, 0, 1, 0, 1, 0, 1, 0]]) + _rows("titok", [0], [[1, 1, 0, 1, 1, 0, 1, 1]])
            + _rows("vanilla", [""], [[0] * 8]))
    rows[0].update(answer_spread(["True"] * 8, targets))  # kd: "True" to every question, right half the time
    rows[1].update(answer_spread(["True", "False"] * 4, targets))
    table = markdown_tables(rows, ["t"], ["kd", "titok"])
    kd, titok = (next(line for line in table.splitlines() if f"| {m} |" in line) for m in ("kd", "titok"))
    assert kd.startswith("| g | kd | 0.500") and kd.endswith(" † |") and "†" not in titok
    assert "- † g kd on t (seed 0): answers 'true' to 8 of 8 examples (100%): collapsed to one answer" in table


def test_a_row_whose_answers_run_out_of_tokens_is_marked_apart_from_a_wrong_one():
    from titok.core.metrics import answered

    options = [["True", "False"]] * 8
    looping = ["True = True. True = True. True = True."] * 3 + ["So the answer is False."] * 5
    assert answered(looping, options) == [0.0] * 3 + [1.0] * 5
    assert answered(["The answer is: true.", "So the answer is Maybe."], options[:2]) == [1.0, 0.0]
    rows = (_rows("titok", [1], [[0, 0, 0, 1, 1, 0, 1, 1]]) + _rows("kd", [1], [[1, 0, 1, 0, 1, 0, 1, 0]])
            + _rows("vanilla", [""], [[0] * 8]))
    rows[0]["answered_share"], rows[1]["answered_share"], rows[2]["answered_share"] = 5 / 8, 1.0, 1 / 8
    table = markdown_tables(rows, ["t"], ["kd", "titok"])
    titok = [line for line in table.splitlines() if line.startswith("| g | titok |")]
    assert titok[0].endswith(" ‡ |") and "‡" not in next(line for line in table.splitlines() if "| kd |" in line)
    assert "- ‡ g titok on t (seed 1): an answer from the answer set on 5 of 8 examples" in table
    # vanilla is one greedy run, of no seed: its note names none
    assert "- ‡ g vanilla on t: an answer from the answer set on 1 of 8 examples" in table


def _panel_titles_overlap(fig) -> bool:
    fig.canvas.draw()
    boxes = [ax.title.get_window_extent() for ax in fig.axes if ax.get_title()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_the_accuracy_bars_are_the_reported_means_and_intervals(tmp_path):
    """Read back from the figure: each bar's height is the mean of results.csv's rows, and its error bar
    runs from the interval's low to its high (the numbers results.md prints), not mean +- low."""
    from matplotlib.container import BarContainer

    from titok.workflows.report import accuracy_figure, write_csv

    rows = (_rows("titok", [0, 1], [[1, 0, 1, 0, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1, 1]])
            + _rows("kd", [0, 1], [[0, 0, 1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 1, 0, 0, 0]])
            + _rows("vanilla", [""], [[1, 0, 1, 1, 0, 1, 0, 1]])
            + _rows("source expert", [""], [[1, 1, 1, 1, 1, 1, 1, 0]], target="s"))
    tasks = ["tracking_shuffled_objects_three_objects", "logical_deduction_seven_objects"]
    rows = [{**r, "task": task} for task in tasks for r in rows]
    write_csv(rows, tmp_path / "results.csv")
    means = {}
    for r in _csv_rows(tmp_path / "results.csv"):
        means.setdefault((r["task"], r["method"]), []).append(float(r["exact_match"]))
    stats = aggregate(rows, "exact_match")
    fig = accuracy_figure(rows, tasks, ["kd", "titok"])
    for ax, task in zip(fig.axes, tasks):
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert [c.get_label() for c in bars] == ["vanilla", "kd", "titok"]
        for container in bars:
            (bar,), (segment,) = container.patches, container.errorbar.lines[2][0].get_segments()
            mean, low, high = stats[(task, "g", container.get_label())][:3]
            assert bar.get_height() == pytest.approx(np.mean(means[(task, container.get_label())]))
            assert (segment[0][1], segment[1][1]) == pytest.approx((low, high)), container.get_label()
            assert low < mean < high or low == mean == high
    assert not _panel_titles_overlap(fig)


def test_the_excess_histogram_titles_do_not_run_into_each_other():
    from titok.workflows.report import excess_figure

    scores = {task: np.random.default_rng(0).normal(size=40) for task in
              ("tracking_shuffled_objects_three_objects", "logical_deduction_seven_objects", "web_of_lies")}
    assert not _panel_titles_overlap(excess_figure(scores, dict.fromkeys(scores, 20)))


def test_token_shading_escapes_text_and_underlines_kept_tokens():
    response = "a<b & c"
    html = shade_tokens(response, starts=[0, 1, 2, 4, 5], ends=[1, 2, 3, 5, 7], excess=[2.0, -1.0, 0.0, 0.5, 4.0],
                        keep=[True, False, False, False, True], scale=2.0)
    spans = re.findall(r'<span style="([^"]*)" title="([^"]*)">(.*?)</span>', html)
    assert [text for _, _, text in spans] == ["a", "&lt;", "b", "&amp;", " c"]
    assert [title for _, title, _ in spans] == ["+2.00", "-1.00", "+0.00", "+0.50", "+4.00"]
    assert ["underline" in style for style, _, _ in spans] == [True, False, False, False, True]
    assert "rgba(0,160,0,1.00)" in spans[0][0] and "rgba(220,0,0,0.50)" in spans[1][0]
    assert "rgba(0,160,0,1.00)" in spans[4][0]  # capped at 1
    assert re.sub(r"<[^>]+>", "", html).replace("&lt;", "<").replace("&amp;", "&") == response  # the gap " " kept


def _csv_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_compare_end_to_end_writes_a_report_with_one_row_per_method(tmp_path, tiny_model_dirs, local_ray):
    path = _compare_yaml(tmp_path, tiny_model_dirs, budget="steps", seeds=[1])  # seed 1 alone: the list form
    cfg = load_compare_config(path)
    report = run_compare(cfg)

    assert {p.name for p in report.iterdir()} == set(REPORT_FILES)
    listed = re.search(r"^Files: (.*)$", (report / "results.md").read_text(), flags=re.MULTILINE).group(1)
    assert set(re.findall(r"`([^`]+)`", listed)) == set(REPORT_FILES) - {"results.md"}
    # equal steps: kd (all 8 samples) and titok (top 4) took the same number of optimizer steps
    runs = tmp_path / "compare" / "runs" / "boolean_expressions" / "seed1"
    steps = {method: json.loads((runs / short_name(tiny_model_dirs["target"]) / folder / "_COMPLETE.json").read_text())
             ["metrics"]["optimizer_steps"] for method, folder in (("titok", "train"), ("kd", "kd/train"))}
    assert steps == {"titok": 2, "kd": 2}  # kd's 8 samples / global batch 4 x 1 epoch
    assert "2 optimizer steps each" in (report / "results.md").read_text()
    assert "1 seed(s) (1);" in (report / "results.md").read_text()
    assert "Paired tests" in (report / "results.md").read_text()
    for image in ("accuracy.png", "excess_histogram.png"):
        assert (report / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _csv_rows(report / "results.csv")
    source, target = short_name(tiny_model_dirs["source"]), tiny_model_dirs["target"]
    for base in (tiny_model_dirs["source"], target):
        mine = [r["method"] for r in rows if r["target"] == base and r["method"] != "source expert"]
        assert sorted(mine) == ["kd", "titok", "vanilla"]
    assert [r["method"] for r in rows if r["method"] == "source expert"] == ["source expert"]
    assert all(0.0 <= float(r["exact_match"]) <= 1.0 and r["n"] == "4" for r in rows)
    assert all(r["option_accuracy"] != "" for r in rows)  # True/False: a closed answer set
    assert {r["method"]: r["lr"] for r in rows} == {"source expert": "", "vanilla": "", "kd": "0.001", "titok": "0.001"}

    markdown = (report / "results.md").read_text()
    for method in ("source expert", "vanilla", "kd", "titok", "majority rate"):
        assert len(re.findall(rf"^\|[^|]*\| {method} \|", markdown, flags=re.MULTILINE)) == \
            (2 if method in ("vanilla", "kd", "titok") else 1) * 2  # two targets, two metrics
    html = (report / "tokens.html").read_text()
    assert html.count('class="sample"') == 5 and "underline" in html

    # the second target reused the first one's queries, labels and scores: no model loaded for them
    second = RunDir(runs / short_name(target)).events()
    assert {e.get("stage") for e in second if e.get("event") == "model_load"} <= {"train"}
    # kd and titok trained on one worker group per target: the target loaded once (one worker), not per method
    for base in (source, short_name(target)):
        events = RunDir(runs / base).events()
        assert [e["stage"] for e in events if e.get("event") == "model_load" and e["stage"] == "train"] == ["train"]
        assert [sorted(e["adapters"]) for e in events if e.get("event") == "shared_pass"] == [["kd", "titok"]]
    assert (runs / source / "scores" / "_COMPLETE.json").read_text() == \
        (runs / short_name(target) / "scores" / "_COMPLETE.json").read_text()

    # a rerun reuses every transplant and evaluation: same numbers, no new model load anywhere, also when
    # a task's per_task fields only restate the shared ones (the report then lists them)
    before = {p: p.read_text() for p in (tmp_path / "compare" / "evals").rglob("*.json")}
    events = sum(len(RunDir(d).events()) for d in runs.iterdir())
    run_compare(load_compare_config(path, ["per_task={boolean_expressions: {labels: {max_new_tokens: 16}}}"]))
    assert "`boolean_expressions`: `labels.max_new_tokens=16`" in (report / "results.md").read_text()
    assert {p: p.read_text() for p in (tmp_path / "compare" / "evals").rglob("*.json")} == before
    assert sum(len(RunDir(d).events()) for d in runs.iterdir()) == events
    assert _csv_rows(report / "results.csv") == rows
