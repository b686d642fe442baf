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
