"""BBH web_of_lies, generated with exact answers: who tells the truth along a chain of claims.

Each step needs only the step before it (a claim about a liar flips, one about a truth-teller
copies), so a small model can learn the rationale the way it learns boolean_expressions'.
"""

from __future__ import annotations

import random

__all__ = ["make_web_of_lies", "solve"]

NAMES = (
    "Fidel Jerry Vina Millicent Raymond Sherrie Ka Jamey Kristian Shaunda Leda Gwenn Alexis Delfina Jim Crista Yoland "
    "Audrie Helene Bernita Tamika Ryan Lorine Elanor Maybelle Antwan Sal Willian Inga Jaymie Kandi Rashida Michaela "
    "Christie Osvaldo Alejandro Andree Phoebe Teressa Conception Gregory Lorenzo Shalonda Amberly Dallas Millie"
).split()


def _says(value: bool) -> str:
    return "tells the truth" if value else "lies"


def solve(first_tells_truth: bool, claims_truth: list[bool]) -> list[bool]:
    """Whether each person tells the truth: the first as given; each next one claims that the one
    before tells the truth (``True``) or lies, and is truthful exactly when the claim holds."""
    truthful = [first_tells_truth]
    for claim in claims_truth:
        truthful.append(claim == truthful[-1])
    return truthful


def make_web_of_lies(rng: random.Random) -> dict:
    names = rng.sample(NAMES, 5)
    first, claims = rng.random() < 0.5, [rng.random() < 0.5 for _ in range(4)]
    truthful = solve(first, claims)
    statements = [f"{names[0]} {_says(first)}."] + [f"{names[i + 1]} says {names[i]} {_says(claim)}."
                                                       for i, claim in enumerate(claims)]
    steps = [f"{names[0]} {_says(first)}"] + [f"{names[i + 1]} says {names[i]} {_says(claim)}, so {names[i + 1]} "
                                               f"{_says(truthful[i + 1])}" for i, claim in enumerate(claims)]
    return {"input": f"Question: {' '.join(statements)} Does {names[-1]} tell the truth?",
            "target": "Yes" if truthful[-1] else "No", "rationale": ". ".join(steps) + "."}
