"""The two-stage output head: a low-bit preview scores every token, the best `n_candidates` get
exact logits from their real rows.

The returned vector has exact logits for the candidates and preview logits for the rest, capped
at the lowest exact candidate logit: greedy, top-k (k <= n_candidates) and top-p then choose
among exactly scored tokens, while plain temperature sampling keeps a tail whose distance from
the full head's distribution benchmarks/bench_vocab.py reports.
"""

from __future__ import annotations

import time

import numpy as np

from .rows import VocabRows


def combine(scores: np.ndarray, cand: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Preview scores (T, V), candidate ids (T, n) and their exact logits (T, n) -> (T, V):
    exact for the candidates, the preview elsewhere capped at the row's lowest exact logit."""
    out = np.minimum(scores, exact.min(axis=1, keepdims=True))
    np.put_along_axis(out, cand, exact, axis=1)
    return out


class TwoStageHead:
    def __init__(self, preview, rows: VocabRows, n_candidates: int):
        """preview: callable (T, d) -> (T, V) float32 scores (a compiled backend segment)."""
        if n_candidates < 1:
            raise ValueError(f"n_candidates must be >= 1; got {n_candidates}")
        self.preview, self.rows = preview, rows
        self.n_candidates = min(int(n_candidates), rows.n)
        self.calls = 0
        self.seconds = 0.0

    def candidates(self, scores: np.ndarray) -> np.ndarray:
        """(V,) preview scores -> the n_candidates best token ids (unordered)."""
        n = self.n_candidates
        if n >= len(scores):
            return np.arange(len(scores))
        return np.argpartition(scores, -n)[-n:]

    def __call__(self, h: np.ndarray) -> np.ndarray:
        """(T, d) final-normed hidden states -> (T, V) logits (see the module docstring)."""
        t0 = time.perf_counter()
        scores = np.asarray(self.preview(h), np.float32)
        cand = np.stack([self.candidates(row) for row in scores])  # (T, n)
        exact = np.stack([self.rows.rows(c) @ x for c, x in zip(cand, h, strict=True)])
        out = combine(scores, cand, exact)
        self.calls += len(h)
        self.seconds += time.perf_counter() - t0
        return out

    def full(self, h: np.ndarray) -> np.ndarray:
        """(T, d) -> (T, V) exact logits over every row, streamed from flash (evaluation)."""
        out = np.empty((len(h), self.rows.n), np.float32)
        for ids, rows in self.rows.stream(self.rows.max_batch):
            out[:, ids] = h @ rows.T
        return out

    def report(self) -> dict:
        return {"head_candidates": self.n_candidates, "head_s": self.seconds,
                "head_tokens": self.calls, **self.rows.report()}
