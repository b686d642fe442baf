"""A validation split of the synthetic training samples, and the rule that picks a learning rate on it.

TiTok has no data of the task: the only thing to tune a recipe on is the synthetic data it made. So a
``train.validation_fraction`` of the selected samples is held out of training, the trained LoRA's loss
on their kept tokens is measured after every epoch, and under ``train.lr_search`` each candidate
learning rate trains its own LoRA on the same rows and the one with the lowest final validation loss
is the run's adapter. The held-out test split of the task is never read for it.

Teacher-forced loss cannot see a LoRA that loops: on boolean_expressions (Gemma-3-270M, seed 0) uld's
1e-2 beat 3e-3 by 0.003 of validation loss and then answered 107 of 200 test questions, the rest
repeating a phrase until the token budget ran out. So the trained LoRA also answers some held-out
queries (``train.validation_generations``) and a rate whose answers end on clearly fewer of them than
another rate's cannot win (``ruled_out``): that adapter ended 5 of 32 held-out answers, 3e-3 all 32.
Nor can it see a LoRA that gives one answer to everything (web_of_lies, uld at 3e-3: "yes" to 90% of
the test questions). So the held-out answers are also counted by the expert's answers to the same
queries (``answer_counts``), and a rate that gives one answer to >= ``metrics.COLLAPSE_SHARE`` of them
where the expert does not (``answers_spread``) cannot win over a rate that does not collapse.

Written by hand: a seeded split of a few hundred rows and an argmin; Ray Tune would add a scheduler
and trial actors around trainings that already share one Ray Train worker group (``train.ray_train``).
"""

from __future__ import annotations

import math

import numpy as np

from titok.core.metrics import COLLAPSE_SHARE, answer_keys

__all__ = ["ENDS_TOLERANCE", "GATHER_FOR_ANSWERS_SHARE", "answer_budget", "answer_counts", "answer_ends",
           "answers_spread", "best_lr", "collapsed_answer_text", "gathers_base_once", "ruled_out", "validation_count",
           "validation_mask"]

# a rate is ruled out when its held-out answers end on more than this share fewer queries than the best rate's
ENDS_TOLERANCE = 0.1


def validation_count(rows: int, fraction: float) -> int:
    """How many of ``rows`` samples are held out: ``fraction`` of them, rounded, at least one when the
    fraction is above zero, and never all of them."""
    if fraction <= 0.0 or rows < 2:
        return 0
    return min(max(1, round(fraction * rows)), rows - 1)


def validation_mask(rows: int, fraction: float, seed: int) -> np.ndarray:
    """True for the held-out rows among ``rows`` samples (in the caller's fixed order, e.g. by sample
    id): a seeded draw, so every worker, every candidate and a resumed run hold out the same rows."""
    mask = np.zeros(rows, dtype=bool)
    held_out = validation_count(rows, fraction)
    if held_out:
        mask[np.random.default_rng([seed, 7919]).permutation(rows)[:held_out]] = True
    return mask


def answer_budget(response_tokens: int) -> int:
    """New tokens a held-out answer may take and still count as ending: twice the expert's response
    (in target tokens) and 16 more, so a rationale somewhat longer than the expert's ends and a loop does not."""
    return 2 * response_tokens + 16


# Under ZeRO-3 the held-out answers gather the whole base once per rate where it takes at most this share
# of a rank's free memory (the rest: the KV cache, activations); else every decode step gathers it.
GATHER_FOR_ANSWERS_SHARE = 0.5


def gathers_base_once(base_bytes: int, free_bytes: int | None) -> bool:
    """Whether a ZeRO-3 rank with ``free_bytes`` of memory (None: unknown) holds the whole base,
    ``base_bytes``, while its LoRA answers the held-out queries: one gather per rate instead of one per
    decode step (DeepSpeed's ``unwrap_model_for_generation``, TRL's ``ds3_gather_for_generation``).
    Gemma-3-270M fits anywhere; a 70B target (140 GB in bf16) on 80 GB GPUs does not."""
    return free_bytes is not None and base_bytes <= GATHER_FOR_ANSWERS_SHARE * free_bytes


def answer_ends(generated: list[int], stop_ids: list[int], response_tokens: int) -> bool:
    """Whether a generated answer (new token ids) ends (one of ``stop_ids``) within ``answer_budget``."""
    return any(token in stop_ids for token in generated[: answer_budget(response_tokens)])


def answer_counts(answers: list[str], expert_responses: list[str]) -> tuple[list[str], list[int], list[int]]:
    """The expert's answer keys on the held-out queries (sorted), the LoRA's ``answers`` counted by them
    with one more count for any other answer (an answer the expert never gives, or none), and the
    expert's own counts by them. ``answers`` may be one rank's share of the queries while
    ``expert_responses`` are all of them: every rank then has the same keys, so the ranks' counts add up."""
    predicted, expert = answer_keys(answers, expert_responses)
    keys = sorted(set(expert))
    known = set(keys)
    return (keys, [predicted.count(k) for k in keys] + [sum(k not in known for k in predicted)],
            [expert.count(k) for k in keys] + [0])


def answers_spread(keys: list[str], counts: list[int], expert_counts: list[int]) -> dict:
    """The LoRA's most common held-out answer (among the expert's), its share of all its answers, the
    expert's top share, and whether the LoRA collapsed: one answer to >= ``COLLAPSE_SHARE`` where the
    expert's answers are not that uniform (as ``metrics.collapsed`` reads a test-set evaluation)."""
    answered, top = sum(counts), int(np.argmax(counts[:-1]))
    share, expert_share = counts[top] / answered, max(expert_counts[:-1]) / sum(expert_counts)
    return {"top": keys[top], "share": share, "expert_share": expert_share,
            "collapsed": share >= COLLAPSE_SHARE > expert_share}


def collapsed_answer_text(spread: dict) -> str:
    """``'yes' to 97%: collapsed`` for a rate whose held-out answers collapsed (an ``answers_spread``)."""
    return f"{spread['top']!r} to {spread['share']:.0%}: collapsed"


def ruled_out(ends: dict[float, float | None], spreads: dict[float, dict | None] | None = None,
              tolerance: float = ENDS_TOLERANCE) -> set[float]:
    """The rates whose held-out answers end on more than ``tolerance`` fewer queries (a share) than the
    best rate's, and then those whose answers collapse to one while another rate's left do not
    (``spreads``: each rate's ``answers_spread``). ``ends``: each rate's share of held-out answers that
    end; None (in either) where not checked (a rate kept from a run without the check, one that
    diverged), which rules nothing out."""
    checked = {lr: share for lr, share in ends.items() if share is not None}
    out = set()
    if checked:
        best = max(checked.values())
        out = {lr for lr, share in checked.items() if share < best - tolerance - 1e-9}
    collapsed = {lr: s["collapsed"] for lr, s in (spreads or {}).items() if s is not None and lr not in out and lr in ends}
    if not all(collapsed.values()):  # one rate left answers with some spread: the collapsed ones cannot win
        out |= {lr for lr, c in collapsed.items() if c}
    return out


def best_lr(curves: dict[float, list[float]], ends: dict[float, float | None] | None = None,
            spreads: dict[float, dict | None] | None = None) -> float:
    """The learning rate whose LoRA ends with the lowest validation loss (the last value of its
    per-epoch curve) among those ``ruled_out`` leaves (``ends``: each rate's share of held-out answers
    that end; ``spreads``: how they spread, ``answers_spread``); a tie goes to the smaller rate. A
    candidate that diverged (no curve, or a non-finite loss) cannot win; raises ValueError when none is left."""
    finite = {lr: curve[-1] for lr, curve in curves.items() if curve and math.isfinite(curve[-1])}
    out = ruled_out({lr: (ends or {}).get(lr) for lr in finite},  # among the rates that finished
                    {lr: (spreads or {}).get(lr) for lr in finite})
    finite = {lr: loss for lr, loss in finite.items() if lr not in out}
    if not finite:
        raise ValueError(f"no learning rate of {sorted(curves)} ended with a finite validation loss")
    return min(finite, key=lambda lr: (finite[lr], lr))
