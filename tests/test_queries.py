import random

from titok.queries import DiversityFilter, build_query_prompt, parse_query

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
