"""BBH boolean_expressions, generated: ``not ( True ) and ( True ) is`` -> ``False``.

Each example also carries a step-by-step ``rationale`` (innermost parentheses first, then ``not``,
``and``, ``or``), so a source adapter learns a response style with more than one token in it.
"""

from __future__ import annotations

import random

__all__ = ["evaluate", "make_boolean_expression", "solve_steps"]


def _expression(rng: random.Random, depth: int) -> list[str]:
    if depth == 0 or rng.random() < 0.3:
        tokens = [rng.choice(["True", "False"])]
    elif rng.random() < 0.3:
        tokens = ["(", *_expression(rng, depth - 1), ")"]
    else:
        tokens = [*_expression(rng, depth - 1), rng.choice(["and", "or"]), *_expression(rng, depth - 1)]
    if rng.random() < 0.25:
        tokens = ["not", *tokens]
    return tokens


def _reduce_flat(tokens: list[str], steps: list[str]) -> str:
    """Evaluate a parenthesis-free expression, recording each operation."""
    tokens = list(tokens)
    i = len(tokens) - 1
    while i >= 0:  # not binds tightest and is right-associative
        if tokens[i] == "not":
            value = str(tokens[i + 1] != "True")
            steps.append(f"not {tokens[i + 1]} = {value}")
            tokens[i : i + 2] = [value]
        i -= 1
    for op in ("and", "or"):
        while op in tokens:
            i = tokens.index(op)
            lhs, rhs = tokens[i - 1] == "True", tokens[i + 1] == "True"
            value = str(lhs and rhs if op == "and" else lhs or rhs)
            steps.append(f"{tokens[i - 1]} {op} {tokens[i + 1]} = {value}")
            tokens[i - 1 : i + 2] = [value]
    return tokens[0]


def solve_steps(tokens: list[str]) -> tuple[bool, list[str]]:
    """(value, steps): innermost parentheses first."""
    tokens, steps = list(tokens), []
    while "(" in tokens:
        close = tokens.index(")")
        open_ = max(i for i in range(close) if tokens[i] == "(")
        tokens[open_ : close + 1] = [_reduce_flat(tokens[open_ + 1 : close], steps)]
    return _reduce_flat(tokens, steps) == "True", steps


def evaluate(tokens: list[str]) -> bool:
    return solve_steps(tokens)[0]


def make_boolean_expression(rng: random.Random) -> dict:
    tokens = _expression(rng, depth=3)
    while len(tokens) < 4:  # BBH expressions have at least two operands
        tokens = _expression(rng, depth=3)
    value, steps = solve_steps(tokens)
    return {"input": " ".join(tokens) + " is", "target": str(value), "rationale": ". ".join(steps) + "."}
