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
    with pytest.raises(ValueError, match="bad.json: expected a non-empty list of rows: BBH"):
        load_task(str(bad))
    bad.write_text(json.dumps([{"prompt": "q", "completion": "a"}] * 12))
    with pytest.raises(ValueError, match=r"rows have fields \['completion', 'prompt'\]"):
        load_task(str(bad))


def test_hub_dataset_path_reads_bbh_and_mmlu_layouts(tmp_path, monkeypatch):
    """``hf:ID`` goes through ``datasets.load_dataset``; a local dataset folder stands in for a hub id
    (the same call; nothing is downloaded here)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read those variables once, at import: where another test imported them first,
    # the missing id below went to the network (five retries, ~23 s) instead of failing at once
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    bbh = tmp_path / "bbh"
    bbh.mkdir()
    (bbh / "test.jsonl").write_text("".join(json.dumps({"input": f"q{i}", "target": "yes" if i % 3 else "no"}) + "\n"
                                            for i in range(24)))
    task = load_task(f"hf:{bbh}", n_seed=4, n_test=10)
    assert (len(task.seed_examples), len(task.test_examples), len(task.train_examples)) == (4, 10, 10)
    assert task.answer_set == ["no", "yes"] and {e["input"] for e in task.test_examples} <= {f"q{i}" for i in range(24)}

    mmlu = tmp_path / "mmlu"
    mmlu.mkdir()
    rows = [{"question": f"Which is {i}?", "choices": [str(i), "x", "y", "z"], "answer": 0} for i in range(20)]
    (mmlu / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    example = load_task(f"hf:{mmlu}", n_seed=2, n_test=5).test_examples[0]
    number = example["input"].split("?")[0].removeprefix("Which is ")
    assert example["target"] == "(A)" and f"(A) {number}" in example["input"]
    assert example["options"] == ["(A)", "(B)", "(C)", "(D)"]

    with pytest.raises(ValueError, match="cannot load hub dataset 'no-such-org/no-such-dataset' \\(config 'x'\\)"):
        load_task("hf:no-such-org/no-such-dataset:x")


def test_multistep_arithmetic_agrees_with_python_eval():
    task = load_task("multistep_arithmetic_two", seed=1)
    for example in task.train_examples + task.test_examples:
        assert eval(example["input"].rstrip("=")) == int(example["target"])


def test_word_sorting_answers_are_the_sorted_list():
    for example in load_task("word_sorting", seed=1).train_examples:
        words = example["input"].split("List: ")[1].split()
        assert example["target"].split() == sorted(words) and len(set(words)) == len(words)


def _balanced(tokens):
    pairs, stack = {")": "(", "]": "[", "}": "{", ">": "<"}, []
    for token in tokens:
        if token in pairs:
            if not stack or stack.pop() != pairs[token]:
                return False
        else:
            stack.append(token)
    return not stack


def test_dyck_completions_close_every_bracket():
    for example in load_task("dyck_languages", seed=1).train_examples:
        prefix = example["input"].split("Input: ")[1].split()
        assert not _balanced(prefix) and _balanced(prefix + example["target"].split())


def test_object_counting_by_an_independent_parse():
    from titok.tasks.words import _CATEGORIES

    numbers = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4, "five": 5}
    irregular = {"mice": "mouse", "peaches": "peach", "potatoes": "potato"}
    for example in load_task("object_counting", seed=1).train_examples:
        listing, question = example["input"][len("I have "):].split(". How many ")
        asked = question[: -len(" do I have?")]
        total = 0
        for phrase in listing.replace(", and ", ", ").split(", "):
            count, item = phrase.split(" ", 1)
            singular = irregular.get(item, item[:-1] if numbers[count] > 1 else item)
            total += numbers[count] * (singular in _CATEGORIES[asked])
        assert total == int(example["target"])


def test_web_of_lies_by_parity_of_the_lies_claimed():
    """Independent rule: the last person is truthful iff the first is, flipped once per claim of 'lies'."""
    import re

    task = load_task("web_of_lies", seed=1)
    assert task.answer_set == ["Yes", "No"]
    answers = []
    for example in task.train_examples:
        first, *claims = re.findall(r"(?:^Question: |says )\w+ (tells the truth|lies)\.", example["input"])
        assert len(claims) == 4
        # person i + 1's truthfulness, by the parity of the lies claimed up to them
        truthful = [(first == "tells the truth") != (claims[: i + 1].count("lies") % 2 == 1) for i in range(4)]
        concluded = re.findall(r"so \w+ (tells the truth|lies)", example["rationale"])
        assert concluded == ["tells the truth" if t else "lies" for t in truthful]
        assert example["target"] == ("Yes" if truthful[-1] else "No")
        answers.append(example["target"])
    assert 0.35 < answers.count("Yes") / len(answers) < 0.65  # no answer wins by default


def test_shuffled_objects_by_simulating_the_swaps():
    import re

    task = load_task("tracking_shuffled_objects_three_objects", seed=1)
    letters = []
    for example in task.train_examples:
        text = example["input"]
        balls = dict(re.findall(r"(Alice|Bob|Claire) has a (\w+) ball", text))
        options = re.findall(r"\(([ABC])\) (\w+) ball", text)
        steps = []
        for a, b in re.findall(r"(Alice|Bob|Claire) and (Alice|Bob|Claire) swap balls", text):
            balls[a], balls[b] = balls[b], balls[a]
            steps.append(f"{a} and {b} swap: Alice {balls['Alice']}, Bob {balls['Bob']}, Claire {balls['Claire']}")
        asked = re.search(r"At the end of the game, (\w+) has the", text).group(1)
        assert len(steps) == 3 and all(step in example["rationale"] for step in steps)
        assert example["target"] == "({})".format(next(letter for letter, color in options if color == balls[asked]))
        assert example["options"] == ["(A)", "(B)", "(C)"]
        letters.append(example["target"])
    assert max(letters.count(x) for x in example["options"]) / len(letters) < 0.45  # no option wins by default


def test_big_bench_multiple_choice_is_shuffled(tmp_path):
    rows = [{"input": f"Which is right, case {i}?", "target_scores": {"right": 1, "wrong": 0, "other": 0, "nope": 0}}
            for i in range(40)]
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"examples": rows}))
    task = load_task(str(path), n_seed=4, n_test=10)
    examples = task.seed_examples + task.train_examples + task.test_examples
    for example in examples:
        letter = example["target"]
        assert f"{letter} right" in example["input"] and example["options"] == ["(A)", "(B)", "(C)", "(D)"]
    # the right answer was first in every source row; after shuffling it is not always (A)
    assert len({e["target"] for e in examples}) > 1
    assert task.answer_set is None and task.metric == "accuracy"


def test_mmlu_csv_loader(tmp_path):
    path = tmp_path / "anatomy_test.csv"
    lines = [f'"Question {i}, with a comma?",one,two,three,four,{"ABCD"[i % 4]}' for i in range(20)]
    path.write_text("\n".join(lines) + "\n")
    task = load_task(str(path), n_seed=2, n_test=5)
    example = task.test_examples[0]
    assert example["input"].startswith("Question") and "\n(C) three" in example["input"]
    assert example["target"] in example["options"]
    bad = tmp_path / "bad.csv"
    bad.write_text("q,a,b,c,d,E\n" * 5)
    with pytest.raises(ValueError, match="answer-letter"):
        load_task(str(bad))


def test_lamp_style_generation_task(tmp_path):
    path = tmp_path / "news_headlines.jsonl"
    path.write_text("\n".join(json.dumps({"input": f"Write a headline for article {i}", "output": f"Headline {i}"})
                              for i in range(20)))
    task = load_task(str(path), n_seed=2, n_test=5)
    assert task.metric == "rouge" and task.answer_set is None
    assert task.test_examples[0]["target"].startswith("Headline")


def test_bbh_closed_answer_set(tmp_path):
    path = tmp_path / "navigate.json"
    path.write_text(json.dumps({"examples": [{"input": f"step {i}", "target": "Yes" if i % 3 else "No"} for i in range(30)]}))
    assert load_task(str(path)).answer_set == ["No", "Yes"]


def test_a_task_files_split_depends_on_its_content_not_its_spelling_and_honours_n_train(tmp_path, monkeypatch):
    """The same file as a relative and an absolute path: one split (it differed, so a test example of
    one run could train another); a copy elsewhere too; --n-train caps the training examples."""
    import json

    rows = [{"input": f"question {i}?", "target": "yes" if i % 3 else "no"} for i in range(120)]
    (tmp_path / "task.json").write_text(json.dumps({"examples": rows}))
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "task.json").write_text(json.dumps({"examples": rows}))
    monkeypatch.chdir(tmp_path)
    relative, absolute = load_task("task.json", n_train=50), load_task(str(tmp_path / "task.json"), n_train=50)
    elsewhere = load_task("copy/task.json", n_train=50)
    for other in (absolute, elsewhere):
        assert [e["input"] for e in other.test_examples] == [e["input"] for e in relative.test_examples]
        assert [e["input"] for e in other.train_examples] == [e["input"] for e in relative.train_examples]
    assert len(relative.train_examples) == 50
    assert len(load_task("task.json", n_train=500).train_examples) == 120 - 8 - 56  # all that is left
    assert load_task("task.json", seed=1, n_train=50).test_examples != relative.test_examples


def test_held_out_examples_never_reach_a_training_split():
    """An evaluation's examples are a prefix of the held-out block, whatever their number, and
    ``titok sft``'s training examples (any n_train) start after it; asking for more is refused."""
    from titok.tasks import HELD_OUT_EXAMPLES

    for spec in ("web_of_lies", "boolean_expressions"):
        trained = {e["input"] for e in load_task(spec, n_train=512).train_examples}
        for n_test in (20, 100, HELD_OUT_EXAMPLES):
            held_out = [e["input"] for e in load_task(spec, n_test=n_test).test_examples]
            assert len(held_out) == n_test and not trained & set(held_out)
            assert held_out == [e["input"] for e in load_task(spec).test_examples][:n_test]
        with pytest.raises(ValueError, match=f"holds {HELD_OUT_EXAMPLES}"):
            load_task(spec, n_test=HELD_OUT_EXAMPLES + 1)
