"""Generation in three layers (mlx-lm's generate.py): a token generator, a streaming layer that
yields small response records with running stats, and the string-returning convenience call
(Model.generate)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .sampling import LogitsProcessor, Sampler


@dataclass
class GenerationChunk:
    """One step of a stream: the new text (may be empty while a character or a possible stop
    string is incomplete), the token id, and running stats."""

    text: str
    token: int | None
    stats: dict = field(default_factory=dict)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | None while running


def generate_step(
    prefill: Callable[[Sequence[int]], np.ndarray],
    decode: Callable[[int], np.ndarray],
    prompt_ids: Sequence[int],
    sampler: Sampler,
    processors: Sequence[LogitsProcessor] = (),
    history: Sequence[int] = (),
) -> Iterator[int]:
    """Yield token ids forever: prefill the prompt, then sample and feed back one at a time.

    prefill(ids) -> last position's logits (vocab,); decode(token) -> next logits (vocab,).
    history: tokens before the prompt that count for repetition penalties.
    """
    tokens = list(history) + list(prompt_ids)
    logits = prefill(prompt_ids)
    while True:
        for p in processors:
            logits = p(tokens, logits)
        token = sampler(logits)
        tokens.append(token)
        yield token
        logits = decode(token)


class StopMatcher:
    """Holds back text that might be the start of a stop string; cuts at a full match."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        for s in self.stop:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                return out, True
        hold = 0
        for s in self.stop:  # the longest suffix of pending that is a prefix of a stop string
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if s.startswith(self.pending[-n:]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
