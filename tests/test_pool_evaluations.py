"""bench/pool_evaluations.py: kept evaluations of separate compare invocations pooled by seed."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("pool_evaluations", Path(__file__).parents[1] / "bench" / "pool_evaluations.py")
pool = sys.modules["pool_evaluations"] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(pool)


def _eval_file(path: Path, scores: dict[str, list[int]]) -> Path:
    """An evaluation file as ``cached_evaluation`` keeps it: per variant its report with per-example scores."""
    reports = {name: {"n": len(s), "exact_match": sum(s) / len(s), "majority_rate": 0.5, "per_example": {"exact_match": s}}
               for name, s in scores.items()}
    path.write_text(json.dumps({"key": {}, "reports": reports}))
    return path


def test_seeds_of_separate_invocations_pool_into_one_paired_test(tmp_path):
    one = _eval_file(tmp_path / "seed1.json", {"vanilla": [0] * 8, "kd": [1, 1, 1, 1, 0, 0, 0, 0], "titok": [1] * 8})
    two = _eval_file(tmp_path / "seed2.json", {"vanilla": [0] * 8, "kd": [1, 1, 0, 0, 0, 0, 0, 0], "titok": [1] * 7 + [0]})
    steps = _eval_file(tmp_path / "steps1.json", {"vanilla": [0] * 8, "titok": [0] * 8})
    sources = [pool.parse_source(f"1={one}"), pool.parse_source(f"2={two}"), pool.parse_source(f"1={steps}:titok=titok (58 steps)")]
    rows = pool.pooled_rows(sources, "t", "g")
    assert sorted((r["method"], r["seed"]) for r in rows) == [
        ("kd", 1), ("kd", 2), ("titok", 1), ("titok", 2), ("titok (58 steps)", 1), ("vanilla", "")]  # vanilla once
    tests = {(t["method"], t["versus"]): t for t in pool.paired_tests(rows, ["t"], ["kd", "titok", "titok (58 steps)"], "exact_match")}
    assert tests[("titok", "kd")]["difference"] == pytest.approx(15 / 16 - 6 / 16) and tests[("titok", "kd")]["n"] == 16
    # a row of seed 1 alone is paired on seed 1 only (not repeated over seed 2 as an untrained row is)
    assert tests[("titok", "titok (58 steps)")]["seeds"] == [1] and tests[("titok", "titok (58 steps)")]["n"] == 8
    assert tests[("titok", "titok (58 steps)")]["difference"] == pytest.approx(1.0)
    assert tests[("titok (58 steps)", "vanilla")]["seeds"] == [1]
    assert "| t | g | titok | titok (58 steps) | exact_match | 1 | +1.000 |" in pool.paired_markdown(list(tests.values()))
    with pytest.raises(SystemExit, match="no variant 'uld'"):
        pool.pooled_rows([pool.parse_source(f"1={one}:uld=uld")], "t", "g")
    with pytest.raises(SystemExit, match="expected SEED=FILE"):
        pool.parse_source(str(one))


def test_a_reports_rows_pool_with_a_later_evaluation_after_the_run_folder_is_gone(tmp_path):
    """A committed report keeps rows.json; its seed's rows (and vanilla) pair with a later invocation's file."""
    from titok.workflows.report import evaluation_row, write_rows

    earlier = _eval_file(tmp_path / "seed0.json", {"vanilla": [0] * 8, "kd": [1, 1, 1, 1, 0, 0, 0, 0],
                                                  "titok": [1, 1, 1, 1, 1, 1, 0, 0]})
    reports = json.loads(earlier.read_text())["reports"]
    rows = [evaluation_row(reports["vanilla"], "t", "g", "vanilla", None), evaluation_row(reports["kd"], "t", "g", "kd", 0),
            evaluation_row(reports["titok"], "t", "g", "titok", 0), evaluation_row(reports["kd"], "other", "g", "kd", 0),
            evaluation_row(reports["kd"], "t", "g", "kd", 1)]
    write_rows(rows, tmp_path / "rows.json")
    later = _eval_file(tmp_path / "seed1.json", {"kd": [1, 1, 0, 0, 0, 0, 0, 0], "titok": [1] * 8})
    pooled = pool.pooled_rows([pool.parse_source(f"0={tmp_path / 'rows.json'}"), pool.parse_source(f"1={later}")], "t", "g")
    assert sorted((r["method"], r["seed"]) for r in pooled) == [("kd", 0), ("kd", 1), ("titok", 0), ("titok", 1), ("vanilla", "")]
    tests = {(t["method"], t["versus"]): t for t in pool.paired_tests(pooled, ["t"], ["kd", "titok"], "exact_match")}
    assert tests[("titok", "kd")]["n"] == 16 and tests[("titok", "kd")]["seeds"] == [0, 1]
    assert tests[("titok", "kd")]["difference"] == pytest.approx(14 / 16 - 6 / 16)
    renamed = pool.pooled_rows([pool.parse_source(f"0={tmp_path / 'rows.json'}:titok=titok (58 steps)")], "t", "g")
    assert [(r["method"], r["per_example"]["exact_match"]) for r in renamed] == [("titok (58 steps)", [1] * 6 + [0] * 2)]


def test_the_source_experts_row_is_named_by_its_base_as_in_a_compare_report(tmp_path):
    """From its evaluation file (whose key names the base) or from a report's rows.json."""
    from titok.workflows.report import write_rows

    path = _eval_file(tmp_path / "source-expert.json", {"expert": [1, 1, 0, 1]})
    kept = json.loads(path.read_text())
    path.write_text(json.dumps({**kept, "key": {"base": "smollm2-135m"}}))
    row = pool.expert_row(path, "t")
    assert (row["target"], row["method"], row["seed"], row["exact_match"]) == ("smollm2-135m", "source expert", "", 0.75)
    write_rows([row], tmp_path / "rows.json")
    assert pool.expert_row(tmp_path / "rows.json", "t")["target"] == "smollm2-135m"
