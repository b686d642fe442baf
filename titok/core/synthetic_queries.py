"""Synthetic queries: few-shot prompts from seed examples, parsing, the on-task check, and the ROUGE-L
diversity filter.

The on-task check (``QueryShape``) learns the shape of the task's inputs from its seeds alone: a
window of lengths in words, the option block ("Options:" then "(A) ..." lines) where every seed has
one, and the ending where every seed ends the same way (a "?" or one last word, as "... is" in
boolean_expressions). A small source model's continuation drifts off that shape (an answer instead
of an input, three questions run together, chatter); such a query teaches the target nothing about
the task, and it would take a place in the pool from one that does. No library checks this; it runs
before the ROUGE filter so an off-task query never blocks an on-task one that resembles it.

The filter keeps a candidate only if its ROUGE-L F1 against every kept query and every seed is below
the threshold (0.7 in the paper). It runs on the driver over the whole pool, so duplicates written
by different actors are caught too (the official release builds the scorer and never applies it).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass

from rouge_score import rouge_scorer

from titok.tasks import Example

__all__ = ["DiversityFilter", "QueryShape", "build_query_prompt", "parse_query"]

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


_OPTION_BLOCK = re.compile(r"^Options:\s*$(\n^\([A-Z]\).+$){2,}", re.MULTILINE)


@dataclass(frozen=True)
class QueryShape:
    """What the seed inputs look like; ``problem(query)`` names how a query differs (None: on task)."""

    min_words: int
    max_words: int
    options: bool  # every seed has an option block
    ending: str | None  # every seed ends with it: "?" or a last word

    @classmethod
    def of(cls, seeds: list[str], slack: float = 0.5) -> "QueryShape":
        """From the seeds: their word counts widened by ``slack`` on each side, their common parts."""
        words = [len(seed.split()) for seed in seeds]
        endings = Counter("?" if seed.rstrip().endswith("?") else (seed.split() or [""])[-1] for seed in seeds)
        (ending, count), = endings.most_common(1)
        options = all(_OPTION_BLOCK.search(seed) for seed in seeds)
        return cls(min_words=max(1, math.floor(min(words) * (1 - slack))), max_words=math.ceil(max(words) * (1 + slack)),
                   options=options,  # with options, the block is the form (the last word is an option's)
                   ending=ending if count == len(seeds) and ending and not options else None)

    def problem(self, query: str) -> str | None:
        words = len(query.split())
        if words < self.min_words:
            return f"shorter than {self.min_words} words"
        if words > self.max_words:
            return f"longer than {self.max_words} words"
        if self.options and not _OPTION_BLOCK.search(query):
            return "no option block"
        if self.ending == "?" and not query.rstrip().endswith("?"):
            return "not a question"
        if self.ending not in (None, "?") and query.split()[-1] != self.ending:
            return f"does not end with {self.ending!r}"
        return None


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
