"""Synthetic queries: few-shot prompts from seed examples, parsing, and the ROUGE-L diversity filter.

The filter keeps a candidate only if its ROUGE-L F1 against every kept query and every seed is below
the threshold (0.7 in the paper). It runs on the driver over the whole pool, so duplicates written
by different actors are caught too (the official release builds the scorer and never applies it).
"""

from __future__ import annotations

import random
import re

from rouge_score import rouge_scorer

from titok.tasks import Example

__all__ = ["DiversityFilter", "build_query_prompt", "parse_query"]

def build_query_prompt(seeds: list[Example], few_shot: int, rng: random.Random) -> str:
    """A raw few-shot completion prompt (no chat template) that ends where a new input should begin.

    Plain continuation works for base and small instruct models alike; asked in a chat turn to
    "write a new example", small models answer with chatter about the task instead of an input.
    """
    shown = rng.sample(seeds, few_shot)
    examples = "".join(f"Example {i + 1}:\n{example['input']}\n\n" for i, example in enumerate(shown))
    return f"{examples}Example {few_shot + 1}:\n"


def parse_query(generated: str) -> str:
    """The generated input: text up to the next blank line or ``Example N:`` label."""
    text = re.split(r"\n\s*\n|\n?Example\s*\d+\s*:", generated.strip(), maxsplit=1)[0]
    return text.strip()


class DiversityFilter:
    """Greedy ROUGE-L filter over a growing pool (rouge-score's LCS-based F1, stemming off)."""

    def __init__(self, seeds: list[str], threshold: float = 0.7):
        self.threshold = threshold
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self._seeds = list(seeds)
        self.kept: list[str] = []

    def max_similarity(self, candidate: str) -> float:
        return max(
            (self._scorer.score(other, candidate)["rougeL"].fmeasure for other in self._seeds + self.kept),
            default=0.0,
        )

    def offer(self, candidate: str) -> bool:
        """Keep ``candidate`` if it is non-empty and below the threshold against everything kept."""
        if not candidate.strip() or self.max_similarity(candidate) >= self.threshold:
            return False
        self.kept.append(candidate)
        return True
