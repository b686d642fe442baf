"""BBH multistep_arithmetic_two, generated: ``((-1 + 2) * (3 - -4)) =`` -> ``7``."""

from __future__ import annotations

import random

__all__ = ["make_multistep_arithmetic"]

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def make_multistep_arithmetic(rng: random.Random) -> dict:
    """Two bracketed pairs joined by an operator, operands in [-9, 9], as in BBH."""
    a, b, c, d = (rng.randint(-9, 9) for _ in range(4))
    op1, op2, op3 = (rng.choice(list(_OPS)) for _ in range(3))
    left, right = _OPS[op1](a, b), _OPS[op3](c, d)
    value = _OPS[op2](left, right)
    steps = [f"{a} {op1} {b} = {left}", f"{c} {op3} {d} = {right}", f"{left} {op2} {right} = {value}"]
    return {"input": f"(({a} {op1} {b}) {op2} ({c} {op3} {d})) =", "target": str(value), "rationale": ". ".join(steps) + "."}
