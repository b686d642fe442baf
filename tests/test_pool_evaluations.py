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
