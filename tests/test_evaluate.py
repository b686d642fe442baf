import pytest

from titok.evaluate import evaluate


@pytest.mark.slow
def test_eval_stage_on_a_tiny_model(tiny_model_dirs, local_ray):
    report = evaluate(tiny_model_dirs["source"], tiny_model_dirs["adapter"], "boolean_expressions", n_test=6,
                      dtype="float32", max_new_tokens=8, batch_size=4)
    assert report["n"] == 6
    assert 0.0 <= report["exact_match"] <= 1.0 and 0.5 <= report["majority_rate"] <= 1.0
    assert 0.0 <= report["option_accuracy"] <= 1.0  # True/False is a closed answer set
    assert len(report["examples"]) == 5 and all(isinstance(e["prediction"], str) for e in report["examples"])
    vanilla = evaluate(tiny_model_dirs["source"], None, "boolean_expressions", n_test=6, dtype="float32",
                       max_new_tokens=8, batch_size=4)
    assert [e["prediction"] for e in vanilla["examples"]] != [e["prediction"] for e in report["examples"]]
