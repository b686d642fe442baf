"""The engine interface: chat-formatted generation with or without the source adapter, and
expert/amateur log-prob scoring of (query, response) pairs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from titok.core.excess import TokenScores
from titok.core.sequences import encode_response

__all__ = ["GenerationParams", "InferenceEngine", "Label", "canonical_logprobs", "named_adapters"]


def named_adapters(adapter: str | dict[str, str] | None) -> dict[str, str]:
    """One adapter folder is named ``default`` (PEFT's name); a zoo passes ``{name: folder}``."""
    if not adapter:
        return {}
    return {"default": str(adapter)} if isinstance(adapter, (str, bytes)) or hasattr(adapter, "__fspath__") else dict(adapter)


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Label:
    """An expert answer and, when its generated tokens are exactly how the text tokenizes, the
    expert's log-prob of each of them (so scoring needs only the amateur pass) and, when asked for,
    its n likeliest log-probs at each of them, (tokens, n) in decreasing order (``titok.core.distill``)."""

    text: str
    expert_logprobs: np.ndarray | None
    top_logprobs: np.ndarray | None = None

    @classmethod
    def of(cls, tokenizer, text: str, generated: list[int], logprobs: list[float], tops=None) -> "Label":
        """Both log-prob kinds kept only where ``text`` re-tokenizes to the generated tokens."""
        kept = canonical_logprobs(tokenizer, text, generated, logprobs)
        return cls(text, kept, None if kept is None or tops is None else np.asarray(tops, dtype=np.float32))


def canonical_logprobs(tokenizer, text: str, generated: list[int], logprobs: list[float]) -> np.ndarray | None:
    """The generated tokens' log-probs if re-tokenizing ``text`` gives those very tokens, else None
    (a non-canonical tokenization, or whitespace the answer was stripped of: that pair is rescored)."""
    return np.asarray(logprobs, dtype=np.float32) if encode_response(tokenizer, text)[0] == list(generated) else None


class InferenceEngine(ABC):
    """One base model (plus optional LoRAs, one active at a time) loaded once per actor."""

    @abstractmethod
    def generate(self, messages: list[str], params: GenerationParams, use_adapter: bool, chat: bool = True) -> list[str]:
        """Answer each user message (``chat``: the engine applies the chat template) or continue each
        raw prompt (``chat=False``); returns the generated texts."""

    @abstractmethod
    def label(self, messages: list[str], params: GenerationParams, top_logprobs: int = 0) -> list[Label]:
        """The expert answers each user message (chat template), keeping each answer token's log-prob
        (and its ``top_logprobs`` likeliest log-probs at each step)."""

    @abstractmethod
    def select_adapter(self, name: str) -> None:
        """Make the adapter called ``name`` the expert for the calls that follow."""

    @abstractmethod
    def score(self, queries: list[str], responses: list[str], known_expert: list | None = None,
              top_n: int = 0) -> list[TokenScores]:
        """Expert (with adapter) and amateur (without) log-probs of each response's tokens; the expert
        pass is skipped for pairs whose ``known_expert`` log-probs are given; where it runs, it keeps the
        expert's ``top_n`` likeliest log-probs at each token too."""

    @abstractmethod
    def response_logprobs(self, queries: list[str], responses: list[str], use_adapter: bool) -> list[np.ndarray]:
        """Log-probs of each response's tokens after its chat prompt, under the active adapter
        (``use_adapter``) or the bare base: an evaluation's option choices."""

    @abstractmethod
    def shutdown(self) -> None:
        """Free the engine's memory on every device (and any process it started) before the next stage
        takes them; the engine is unusable afterwards."""
