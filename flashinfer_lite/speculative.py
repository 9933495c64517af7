"""Speculative decoding with drafts looked up in the text itself (prompt lookup / n-gram drafts).

A coder's answers repeat its prompt: an edited function, a renamed class, a quoted line. The
drafter finds the latest earlier occurrence of the last few tokens and proposes the tokens that
followed it; one forward pass over [pending token, draft...] scores every proposal at once, so
one pass's weight reads (from DRAM or, for flash-resident weights, from flash) serve every
accepted token.

Verification is exact. Each position's token is drawn by the normal sampler from the logits the
model computed with the accepted prefix in context, and the pass stops at the first draw that
differs from the draft. Every emitted token is therefore drawn from the distribution sequential
decoding would use at that point: greedy output is identical, and sampling keeps its
distribution (it consumes random numbers in the same order, one draw per emitted token).

The same idea as llama.cpp's lookup decoding, vLLM's n-gram speculator and transformers'
`prompt_lookup_num_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError
from .sampling import LogitsProcessor, Sampler


@dataclass(frozen=True)
class DraftOptions:
    """How many tokens to draft per pass (0 turns speculation off) and the n-gram sizes that
    may match, longest tried first (llama.cpp's --draft-max and lookup n-gram range)."""

    num_draft: int = 8
    ngram_max: int = 3
    ngram_min: int = 1

    def __post_init__(self):
        if not isinstance(self.num_draft, (int, np.integer)) or self.num_draft < 0:
            raise InvalidArgumentError(f"num_draft must be an integer >= 0; got {self.num_draft!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise InvalidArgumentError(
                f"need 1 <= ngram_min <= ngram_max; got {self.ngram_min!r}, {self.ngram_max!r}")


class NgramDrafter:
    """Drafts the tokens that followed the latest earlier occurrence of the text's last n tokens
    (n from ngram_max down to ngram_min)."""

    def __init__(self, options: DraftOptions):
        self.options = options

    def __call__(self, tokens: Sequence[int], limit: int | None = None) -> list[int]:
        k = self.options.num_draft if limit is None else min(limit, self.options.num_draft)
        if k <= 0 or len(tokens) < 2:
            return []
        arr = np.asarray(tokens, np.int64)
        for n in range(min(self.options.ngram_max, len(arr) - 1), self.options.ngram_min - 1,
                       -1):
            tail = arr[-n:]
            # windows starting at 0 .. len-n-1: every occurrence that ends before the tail
            starts = np.flatnonzero(arr[: len(arr) - n] == tail[0])
            for j in range(1, n):
                starts = starts[arr[starts + j] == tail[j]]
            if starts.size:
                s = int(starts[-1]) + n  # the latest match: nearest context, likeliest repeat
                return arr[s : s + k].tolist()
        return []


@dataclass
class SpeculationStats:
    passes: int = 0  # forward passes after the prompt (each verifies 0..num_draft drafts)
    drafted: int = 0
    accepted: int = 0

    @property
    def tokens_per_pass(self) -> float | None:
        """Generated tokens per forward pass: 1 + accepted drafts per pass."""
        return (self.passes + self.accepted) / self.passes if self.passes else None

    def as_dict(self) -> dict:
        return {"spec_passes": self.passes, "spec_drafted": self.drafted,
                "spec_accepted": self.accepted, "spec_tokens_per_pass": self.tokens_per_pass}


def speculative_step(
    prefill: Callable[[Sequence[int]], np.ndarray],
    forward_all: Callable[[Sequence[int]], np.ndarray],
    trim: Callable[[int], None],
    prompt_ids: Sequence[int],
    sampler: Sampler,
    drafter: NgramDrafter,
    processors: Sequence[LogitsProcessor] = (),
    history: Sequence[int] = (),
    stats: SpeculationStats | None = None,
    room: Callable[[], int] | None = None,
) -> Iterator[int]:
    """Yield token ids forever, like generate_step, verifying drafts in one pass each.

    prefill(ids) -> last position's logits (vocab,); forward_all(ids) -> (len(ids), vocab)
    logits, each position's ids appended to the cache; trim(n) drops the cache's last n
    positions; room() -> how many more positions the cache may take (drafts are cut to fit).
    The drafter sees history + prompt + generated tokens. When the consumer stops early, the
    cache may hold verified drafts past the last yielded token: the caller trims to what it
    kept (the tokens it received).
    """
    stats = stats if stats is not None else SpeculationStats()
    tokens = list(history) + list(prompt_ids)

    def draw(logits: np.ndarray) -> int:
        for p in processors:
            logits = p(tokens, logits)
        token = sampler(logits)
        tokens.append(token)
        return token

    pending = draw(prefill(prompt_ids))
    yield pending
    # Draft length adapts like a congestion window: halved after a pass that accepted nothing,
    # doubled back after one that accepted everything, so text the drafts miss (fresh code)
    # pays for passes of 2 tokens, not num_draft + 1.
    k = drafter.options.num_draft
    while True:
        limit = k if room is None else min(k, max(room() - 1, 0))
        draft = drafter(tokens, limit)
        rows = forward_all([pending, *draft])  # (1 + len(draft), vocab)
        stats.passes += 1
        stats.drafted += len(draft)
        for j in range(len(draft) + 1):
            token = draw(rows[j])
            if j < len(draft) and token == draft[j]:
                stats.accepted += 1
                yield token
                continue
            trim(len(draft) - j)  # drop the drafts after the last accepted one
            if draft and j == 0:
                k = max(1, k // 2)
            elif draft and j == len(draft):
                k = min(drafter.options.num_draft, 2 * k)
            pending = token
            yield token
            break
