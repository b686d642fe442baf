"""BBH tracking_shuffled_objects_three_objects, generated with exact answers: who holds which ball
after three swaps, as a three-option multiple choice.

The rationale restates everyone's ball after each swap, so each step is a copy with two entries
exchanged: learnable by a small model, unlike the whole swap sequence in one jump.
"""

from __future__ import annotations

import random

from titok.tasks.files import LETTERS, lettered, option_labels

__all__ = ["make_shuffled_objects", "swap_all"]

PEOPLE = ("Alice", "Bob", "Claire")
COLORS = ("red", "blue", "green", "yellow", "pink", "white", "black", "purple", "orange", "brown")


def swap_all(holding: dict[str, str], swaps: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Who holds what after each swap."""
    states = []
    for a, b in swaps:
        holding = {**holding, a: holding[b], b: holding[a]}
        states.append(holding)
    return states


def _state(holding: dict[str, str]) -> str:
    return ", ".join(f"{person} {holding[person]}" for person in PEOPLE)


def make_shuffled_objects(rng: random.Random) -> dict:
    colors = rng.sample(COLORS, 3)
    start = dict(zip(PEOPLE, colors))
    swaps = [tuple(rng.sample(PEOPLE, 2)) for _ in range(3)]
    asked = rng.choice(PEOPLE)
    states = swap_all(start, swaps)
    answer = LETTERS[colors.index(states[-1][asked])]
    holdings = "{}, {}, and {}".format(*(f"{p} has a {c} ball" for p, c in start.items()))
    trades = ". ".join(f"{when}, {a} and {b} swap balls" for when, (a, b) in zip(("First", "Then", "Finally"), swaps))
    steps = [f"Start: {_state(start)}"] + [f"{a} and {b} swap: {_state(s)}" for (a, b), s in zip(swaps, states)]
    return {
        "input": lettered(f"Alice, Bob, and Claire are playing a game. At the start of the game, they are each holding a ball: "
                 f"{holdings}. As the game progresses, pairs of players trade balls. {trades}. At the end of the game, "
                 f"{asked} has the", [f"{c} ball" for c in colors]),
        "target": f"({answer})",
        "rationale": ". ".join(steps) + f". At the end, {asked} has the {states[-1][asked]} ball.",
        "options": option_labels(len(colors)),
    }
