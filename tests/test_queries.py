import random

import pytest

from titok.core.synthetic_queries import DiversityFilter, QueryShape, build_query_prompt, parse_query
from titok.tasks import load_task

SEEDS = [{"input": f"True and {'not ' * i}False is", "target": "x"} for i in range(5)]


def test_prompt_is_a_raw_few_shot_continuation():
    prompt = build_query_prompt(SEEDS, 3, random.Random(0))
    assert prompt.count("Example ") == 4 and prompt.endswith("Example 4:\n")
    assert sum(seed["input"] in prompt for seed in SEEDS) == 3


def test_parse_query_stops_at_the_next_example_or_blank_line():
    assert parse_query(" not True or False is\n\nExample 5:\nTrue is") == "not True or False is"
    assert parse_query("not True is\nExample 5: True") == "not True is"
    assert parse_query("\n\n") == ""


def test_rouge_l_filter_against_seeds_and_kept_queries():
    diversity = DiversityFilter(["not True and False or True is"], threshold=0.7)
    assert not diversity.offer("not True and False or True is")  # a seed
    assert diversity.offer("( False or not False ) and True and True and not True is")
    assert not diversity.offer("( False or not False ) and True and True and not False is")  # near-duplicate
    assert not diversity.offer("   ")
    assert diversity.kept == ["( False or not False ) and True and True and not True is"]
    assert diversity.max_similarity("completely different words here") < 0.7


@pytest.mark.parametrize("task", ["boolean_expressions", "web_of_lies", "tracking_shuffled_objects_three_objects",
                                  "object_counting", "word_sorting"])
def test_every_seed_is_on_task_by_its_own_shape(task):
    seeds = [e["input"] for e in load_task(task, seed=0).seed_examples]
    shape = QueryShape.of(seeds)
    assert [shape.problem(seed) for seed in seeds] == [None] * len(seeds)


def test_queries_off_the_seeds_shape_are_named_by_how():
    """What SmolLM2-135M wrote for boolean_expressions in the demo, and a tracking query without options."""
    shape = QueryShape.of([e["input"] for e in load_task("boolean_expressions", seed=0).seed_examples])
    assert (shape.min_words, shape.max_words, shape.options, shape.ending) == (3, 24, False, "is")
    assert shape.problem("not False or (False and False) is") is None
    assert shape.problem("True and False and True or False and False and False and True") == "does not end with 'is'"
    assert shape.problem("None of the given answers") == "does not end with 'is'"
    assert shape.problem("not True") == "shorter than 3 words"
    assert shape.problem(" ".join(["True and"] * 13) + " True is") == "longer than 24 words"
    web = QueryShape.of([e["input"] for e in load_task("web_of_lies", seed=0).seed_examples])
    assert web.problem("Question: Jim lies. Ann says Jim lies. Bo says Ann lies. Does Bo tell the truth") == "not a question"
    tracking = QueryShape.of([e["input"] for e in load_task("tracking_shuffled_objects_three_objects", seed=0).seed_examples])
    seed = load_task("tracking_shuffled_objects_three_objects", seed=0).seed_examples[0]["input"]
    assert tracking.problem(seed.split("\nOptions:")[0]) == "no option block"


@pytest.mark.slow
def test_a_pool_of_off_task_queries_stops_naming_what_was_rejected(tiny_model_dirs, tmp_path, local_ray):
    """A tiny random model writes random text: no query has the seeds' shape, and the stage says so,
    counted by reason, with the setting that turns the check off; the event log has the counts."""
    from titok.workflows.pipeline import transplant
    from titok.runstate import RunDir
    from tests.conftest import tiny_transplant_config

    cfg = tiny_transplant_config(tiny_model_dirs, tmp_path / "run", "queries.on_task=true", "queries.max_rounds=1")
    with pytest.raises(RuntimeError, match=r"only 0 of 12 queries passed the checks in 1 rounds \(\d+ written; rejected: "
                                           r"\d+ (shorter|longer|does not end).*queries\.on_task=false"):
        transplant(cfg, until="queries")
    (checked,) = [e for e in RunDir(tmp_path / "run").events() if e["event"] == "queries_checked"]
    assert checked["kept"] == 0 and sum(checked["rejected"].values()) == checked["written"]
    assert checked["shape"]["ending"] == "is"
    from titok.core.synthetic_queries import QueryShape
    from titok.stages.queries import REJECTED_EXAMPLES
    from titok.tasks import load_task

    shape = QueryShape.of([e["input"] for e in load_task("boolean_expressions", seed=0).seed_examples])
    examples = checked["rejected_examples"]
    assert set(examples) == set(checked["rejected"])  # every reason shows what it refused, and why
    for why, queries in examples.items():
        assert 1 <= len(queries) <= min(REJECTED_EXAMPLES, checked["rejected"][why])
        assert all(shape.problem(q) == why for q in queries if q.strip())
