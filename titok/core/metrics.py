"""Evaluation metrics: answer extraction + exact match, option log-likelihood accuracy, ROUGE, majority rate.

- Answer extraction: the text after the last "the answer is" (our rationale format and BBH's CoT
  format), else the first non-empty line; a trailing period and surrounding whitespace are dropped.
- Exact match compares extracted answer and target after collapsing whitespace, case-insensitively. A
  target that is an option letter, ``(C)``, also matches an answer that starts with it, ``(C) yellow
  ball``: a model that names the option and restates its text has answered (BBH's own answer format).
  The spread of answers (collapse) and the share answered count answers by the same key
  (``answer_key``), so "(A) yellow ball" and "(A) red ball" are one answer, (A).
- Option log-likelihood: each candidate answer is scored as the response to the prompt; the choice is
  the candidate with the highest *mean* log-prob per token (length-normalized, so longer options are
  not penalized for having more tokens).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
from rouge_score import rouge_scorer

__all__ = ["COLLAPSE_SHARE", "UNANSWERED_SHARE", "answer_key", "answer_keys", "answer_spread", "answered", "collapse_text",
           "collapsed", "exact_match", "exact_matches",
           "extract_answer", "majority_rate", "option_loglik_choices", "rouge",
           "rouge_per_example"]

_ANSWER_MARKER = "the answer is"
_OPTION_LETTER = re.compile(r"\([A-Z]\)", re.IGNORECASE)


def _normalize(text: str) -> str:
    return " ".join(text.split()).strip().rstrip(".").strip().lower()


def extract_answer(text: str) -> str:
    marker = text.lower().rfind(_ANSWER_MARKER)
    if marker >= 0:
        rest = text[marker + len(_ANSWER_MARKER) :].lstrip(" :")
        return rest.split("\n")[0].strip().rstrip(".").strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0].rstrip(".").strip() if lines else ""


def exact_matches(predictions: list[str], targets: list[str]) -> list[float]:
    """1.0 where the extracted answer equals the target (normalized), else 0.0: one per example."""
    if not targets:
        raise ValueError("no targets to compare with")
    return [float(_matches(extract_answer(p), t)) for p, t in zip(predictions, targets, strict=True)]


def _lettered(answers) -> bool:
    """Whether the answers are option letters, ``(A)``, ``(B)``, ...: then an answer is its letter."""
    answers = list(answers)
    return bool(answers) and all(_OPTION_LETTER.fullmatch(a.strip()) for a in answers)


def answer_key(answer: str, lettered: bool) -> str:
    """An answer as every metric compares it: where the answers are option letters, its leading letter
    (``(C) yellow ball`` -> ``(c)``: it names the option, BBH's own format); else its normalized text.
    Exact match, the spread of answers and the share answered all count through this one key."""
    if lettered and (option := _OPTION_LETTER.match(answer.strip())):
        return option.group().lower()
    return _normalize(answer)


def answer_keys(predictions: list[str], references: list[str]) -> tuple[list[str], list[str]]:
    """The ``answer_key`` of each prediction's and each reference's extracted answer, by letter where the
    references answer with option letters (where no gold label exists, e.g. an expert's responses)."""
    lettered = _lettered(extract_answer(r) for r in references)
    return ([answer_key(extract_answer(p), lettered) for p in predictions],
            [answer_key(extract_answer(r), lettered) for r in references])


def _matches(answer: str, target: str) -> bool:
    lettered = _lettered([target])
    return answer_key(answer, lettered) == answer_key(target, lettered)


def exact_match(predictions: list[str], targets: list[str]) -> float:
    """Share of predictions whose extracted answer equals the target (normalized)."""
    return float(np.mean(exact_matches(predictions, targets)))


def majority_rate(targets: list[str]) -> float:
    """Accuracy of always answering the most common target: the floor an accuracy must beat."""
    if not targets:
        raise ValueError("no targets")
    return Counter(_normalize(t) for t in targets).most_common(1)[0][1] / len(targets)


COLLAPSE_SHARE = 0.9  # one answer to this share of the examples or more: the model has collapsed


def answer_spread(predictions: list[str], targets: list[str], top: int = 5) -> dict:
    """How varied the answers are: the most common extracted answer and its share, and the
    distribution of extracted answers beside the gold one (the ``top`` most common of each)."""
    lettered = _lettered(set(targets))
    answers = Counter(answer_key(extract_answer(p), lettered) for p in predictions)
    gold = Counter(answer_key(t, lettered) for t in targets)
    answer, count = answers.most_common(1)[0]
    return {"top_prediction": answer, "top_prediction_share": count / len(predictions),
            "predictions_by_answer": dict(answers.most_common(top)), "targets_by_answer": dict(gold.most_common(top))}


def answered(predictions: list[str], options: list[list[str]]) -> list[float]:
    """1.0 where the extracted answer is one of that example's options (normalized), else 0.0: a miss
    that is no answer at all (a loop, reasoning cut off by the token budget) against a wrong answer."""
    out = []
    for prediction, example_options in zip(predictions, options, strict=True):
        lettered = _lettered(example_options)
        out.append(float(answer_key(extract_answer(prediction), lettered) in {answer_key(o, lettered) for o in example_options}))
    return out


UNANSWERED_SHARE = 0.1  # more examples than this without an answer from the answer set: the report says so


def collapsed(report: dict) -> bool:
    """One answer to >= ``COLLAPSE_SHARE`` of the examples where the gold answers are not that uniform
    (their majority rate, the most common gold answer's share, is below it): whatever its accuracy,
    such a model answers the question it was not asked (a coin with one face)."""
    share = report.get("top_prediction_share")
    return share is not None and share >= COLLAPSE_SHARE and report["majority_rate"] < COLLAPSE_SHARE


def collapse_text(report: dict) -> str:
    return (f"answers {report['top_prediction']!r} to {round(report['top_prediction_share'] * report['n'])} of "
            f"{report['n']} examples ({report['top_prediction_share']:.0%}): collapsed to one answer")


def rouge_per_example(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """ROUGE-1 and ROUGE-L F1 of each example (rouge-score, stemming on, as in LaMP's evaluation)."""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {name: [float(s[name].fmeasure) for s in scores] for name in ("rouge1", "rougeL")}


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F1."""
    return {name: float(np.mean(values)) for name, values in rouge_per_example(predictions, references).items()}


def option_loglik_choices(logprobs_of, queries: list[str], options: list[list[str]]) -> list[int]:
    """Index of the candidate with the highest mean token log-prob, for each query. ``logprobs_of``:
    (queries, responses) -> each response's token log-probs after its prompt (an engine's
    ``response_logprobs`` with its adapter on or off), called once for every (query, option)."""
    flat = [(qi, option) for qi, query_options in enumerate(options) for option in query_options]
    logprobs = logprobs_of([queries[qi] for qi, _ in flat], [option for _, option in flat])
    means = [float(np.mean(lp)) if len(lp) else -np.inf for lp in logprobs]
    choices, position = [], 0
    for query_options in options:
        scores = means[position : position + len(query_options)]
        choices.append(int(np.argmax(scores)))
        position += len(query_options)
    return choices
