import json
import random

import pytest

from titok.tasks import load_task, reference_response
from titok.tasks.boolean_expressions import _expression, evaluate, solve_steps


def test_boolean_expressions_agree_with_python_eval():
    rng = random.Random(7)
    for _ in range(3000):
        tokens = _expression(rng, depth=4)
        assert evaluate(tokens) == eval(" ".join(tokens))  # an independent evaluator


def test_rationale_steps_are_each_correct():
    value, steps = solve_steps("not ( True and False ) or False".split())
    assert value is True
    assert steps == ["True and False = False", "not False = True", "True or False = True"]
    for step in steps:
        lhs, rhs = step.split(" = ")
        assert str(eval(lhs)) == rhs


def test_splits_are_seeded_and_disjoint():
    a, b = load_task("boolean_expressions", seed=3), load_task("boolean_expressions", seed=3)
    assert a == b
    inputs = [e["input"] for e in a.seed_examples + a.train_examples + a.test_examples]
    assert len(inputs) == len(set(inputs)) == 8 + 256 + 200
    assert load_task("boolean_expressions", seed=4).seed_examples != a.seed_examples
    example = a.train_examples[0]
    assert reference_response(example).endswith(f"So the answer is {example['target']}.")


def test_bbh_json_loader(tmp_path):
    path = tmp_path / "sports_understanding.json"
    path.write_text(json.dumps({"examples": [{"input": f"q{i}", "target": "yes" if i % 2 else "no"} for i in range(30)]}))
    task = load_task(str(path), n_seed=4, n_test=10)
    assert task.name == "sports_understanding"
    assert (len(task.seed_examples), len(task.test_examples), len(task.train_examples)) == (4, 10, 16)
    assert reference_response(task.seed_examples[0]) in ("yes", "no")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="BBH format"):
        load_task(str(bad))
