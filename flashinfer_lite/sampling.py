"""Samplers and logits processors, built by factories (mlx-lm's sample_utils style).

A logits processor is `(tokens, logits) -> logits` on one position's (vocab,) float32 logits; a
sampler is `logits -> token id`. Bad arguments raise InvalidArgumentError naming the value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .errors import InvalidArgumentError

Sampler = Callable[[np.ndarray], int]
LogitsProcessor = Callable[[Sequence[int], np.ndarray], np.ndarray]


def validate_sampling(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      min_p: float = 0.0, repeat_penalty: float = 1.0,
                      repeat_last_n: int = 64) -> None:
    checks = [
        (temperature is not None and np.isfinite(temperature) and temperature >= 0,
         f"temperature must be >= 0; got {temperature!r}"),
        (isinstance(top_k, (int, np.integer)) and top_k >= 0,
         f"top_k must be an integer >= 0 (0 = off); got {top_k!r}"),
        (0.0 < top_p <= 1.0, f"top_p must be in (0, 1]; got {top_p!r}"),
        (0.0 <= min_p < 1.0, f"min_p must be in [0, 1); got {min_p!r}"),
        (repeat_penalty > 0 and np.isfinite(repeat_penalty),
         f"repeat_penalty must be > 0; got {repeat_penalty!r}"),
        (isinstance(repeat_last_n, (int, np.integer)) and repeat_last_n >= 0,
         f"repeat_last_n must be an integer >= 0; got {repeat_last_n!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidArgumentError(message)


def greedy(logits: np.ndarray) -> int:
    """The temperature-0 sampler. A device backend that sees this sampler and no logits
    processors may choose tokens on the device instead (generate.Runner.greedy_tokens)."""
    return int(np.argmax(logits))


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, seed: int | None = None) -> Sampler:
    """Greedy at temperature 0; otherwise top-k, then top-p, then min-p, then a draw.

    The order follows llama.cpp's default sampler chain (top-k, top-p, min-p, temperature).
    """
    validate_sampling(temperature, top_k, top_p, min_p)
    if temperature == 0:
        return greedy
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        logits = np.asarray(logits, np.float64)
        if 0 < top_k < logits.shape[-1]:
            ids = np.argpartition(-logits, top_k - 1)[:top_k]
        else:
            ids = np.arange(logits.shape[-1])
        order = ids[np.argsort(-logits[ids], kind="stable")]  # candidates, best first
        z = logits[order] / temperature
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        if top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1)
            order, probs = order[:keep], probs[:keep]
        if min_p > 0.0:
            keep = probs >= min_p * probs[0]
            order, probs = order[keep], probs[keep]
        probs = probs / probs.sum()
        return int(order[rng.choice(len(order), p=probs)])

    return sample


def make_repetition_penalty(penalty: float, last_n: int = 64) -> LogitsProcessor | None:
    """llama.cpp's rule: a recent token's positive logit is divided, a negative one multiplied."""
    validate_sampling(repeat_penalty=penalty, repeat_last_n=last_n)
    if penalty == 1.0 or last_n == 0:
        return None

    def process(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        recent = np.unique(np.asarray(tokens[-last_n:], np.int64))
        if recent.size == 0:
            return logits
        logits = logits.copy()
        sel = logits[recent]
        logits[recent] = np.where(sel > 0, sel / penalty, sel * penalty)
        return logits

    return process
