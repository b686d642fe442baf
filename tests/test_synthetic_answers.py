"""bench/synthetic_answers.py: its puzzle parsers agree with the task generators, and refuse the
ill-posed puzzles a small query writer produces (a note's counts rest on both)."""

import importlib.util
import random
import sys
from pathlib import Path

import pytest

from titok.tasks import BUILTIN_TASKS, reference_response

_SPEC = importlib.util.spec_from_file_location("synthetic_answers", Path(__file__).parents[1] / "bench" / "synthetic_answers.py")
answers = sys.modules["synthetic_answers"] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(answers)


@pytest.mark.parametrize("task", sorted(answers.RULES))
def test_the_parsers_give_the_generators_answer(task):
    rules, rng = answers.RULES[task], random.Random(0)
    examples = [BUILTIN_TASKS[task](rng) for _ in range(200)]
    assert [rules.gold(e["input"]) for e in examples] == [e["target"] for e in examples]
    assert [answers.final_answer(rules, reference_response(e)) for e in examples] == [e["target"] for e in examples]


PUZZLE = ("Sarah, Emily, and James are playing a game. At the start of the game, they are each holding a ball: "
          "Sarah has a blue ball, Emily has a green ball, and James has a red ball. As the game progresses, pairs of "
          "players trade balls. {swaps}. At the end of the game, {asked} has the\nOptions:\n{options}")
OPTIONS = "(A) red ball\n(B) blue ball\n(C) green ball"


def tracking(swaps="First, Sarah and Emily swap balls. Then, Emily and James swap balls", asked="Emily", options=OPTIONS):
    return answers.tracking_gold(PUZZLE.format(swaps=swaps, asked=asked, options=options))


def test_tracking_follows_any_number_of_swaps_by_name():
    assert tracking() == "(A)"  # Emily: green -> blue -> red
    four = ("First, Sarah and Emily swap balls. Then, Emily and James swap balls. Next, Sarah and Emily swap balls. "
            "Finally, Emily and James swap balls, and finally, Sarah and James swap balls")
    assert tracking(four, asked="Sarah") == "(C)"  # green, green, red, red, then James's green


@pytest.mark.parametrize("broken", [
    {"swaps": "First, Sarah and Sarah swap balls"},  # a player swaps with herself
    {"swaps": "First, Sarah and Bob swap balls"},  # a player never introduced
    {"asked": "Bob"},
    {"options": "(A) orange ball\n(B) purple ball\n(C) pink ball"},  # the answer is not an option
    {"options": "(A) red ball\n(B) red ball\n(C) green ball"},  # the answer is two options
    {"swaps": "First, Sarah and Emily trade places"},
])
def test_tracking_refuses_an_ill_posed_puzzle(broken):
    assert tracking(**broken) is None


def test_tracking_refuses_repeated_names_or_colours():
    assert answers.tracking_gold(PUZZLE.replace("Emily has a green", "Emily has a blue").format(
        swaps="First, Sarah and Emily swap balls", asked="Emily", options=OPTIONS)) is None
    assert answers.tracking_gold(PUZZLE.replace("and James are", "and Sarah are").format(
        swaps="First, Sarah and Emily swap balls", asked="Emily", options=OPTIONS)) is None


@pytest.mark.parametrize("query,gold", [
    ("not False or ( False and False ) is", "True"),  # not binds first, then or
    ("not False or (False and False) is", "True"),  # brackets touching their words
    ("True or False and False is", "True"),  # and before or, as Python reads it
    ("not ( True or False ) and True is", "False"),
    ("False, False and True and False is", None),  # a comma is not the task's
    ("False and (False is True or True is False) is", None),  # "is" inside the expression
    ("True and True, False and True is", None),
    ("( True ) and ( False is", None),  # unbalanced
    ("True and is", None),
    ("not True is", None),  # fewer than the generator's four tokens
    ("True and False", None),  # no closing "is"
])
def test_boolean_parses_only_the_generators_grammar(query, gold):
    assert answers.boolean_gold(query) == gold


def test_the_sample_score_report_counts_what_top_m_keeps():
    import pandas as pd

    scores = pd.DataFrame({"gold": ["True", None, "False", None], "answer": ["True", "True", "True", None],
                           "sample_score": [1.0, 4.0, 2.0, 3.0], "n_tokens": [40, 10, 30, 20]})
    ranks = answers.what_the_sample_score_ranks(scores, pd.Series([False, True, False, True]))
    assert ranks["spearman_with_response_tokens"] == -1.0  # shorter, higher: the mean's bias
    assert ranks["of_the_task_form_in_top_m"] == {"found": 0, "at_random": 1.0}
    assert ranks["median"] == {"of_the_task_form": 1.5, "not_of_the_task_form": 3.5, "expert_right": 1.0, "expert_wrong": 2.0}


def test_boolean_steps_checks_each_step_of_a_rationale():
    from titok.tasks.boolean_expressions import make_boolean_expression

    example = make_boolean_expression(random.Random(3))
    rationale = example["rationale"] + f" So the answer is {example['target']}."
    steps = answers.boolean_steps(rationale)
    assert len(steps) == rationale.count(" = ") and all(right for _, right in steps)
    start, _ = steps[0]
    result = "True" if rationale.startswith("True", start) else "False"
    flipped = rationale[:start] + ("False" if result == "True" else "True") + rationale[start + len(result):]
    assert [right for _, right in answers.boolean_steps(flipped)] == [False] + [True] * (len(steps) - 1)
    assert answers.boolean_steps("not None = True. True and = False. So the answer is True.") == []  # not the task's grammar


def test_step_results_counts_the_token_filter_on_right_and_wrong_steps():
    import pandas as pd

    response = "not False = True. True and False = True."  # the second step is wrong
    tokens = [(0, 3), (3, 9), (9, 11), (11, 16), (16, 17), (17, 22), (22, 26), (26, 32), (32, 34), (34, 39), (39, 40)]
    starts, ends = map(list, zip(*tokens))
    scores = pd.DataFrame({"sample_id": [0, 1], "response": [response] * 2, "offset_starts": [starts] * 2,
                           "offset_ends": [ends] * 2, "excess": [[0.0] * 3 + [2.0] + [0.0] * 5 + [0.5, 0.0]] * 2})
    kept = pd.DataFrame({"sample_id": [0], "keep": [[True] * 9 + [False, True]]})  # sample 0 in top-M, its wrong result dropped
    found = answers.step_results(scores, kept, answers.boolean_steps)
    assert found == {"right": {"steps": 2, "median_result_excess": 2.0, "in_top_m": 1, "kept_by_token_filter": 1.0},
                     "wrong": {"steps": 2, "median_result_excess": 0.5, "in_top_m": 1, "kept_by_token_filter": 0.0}}
