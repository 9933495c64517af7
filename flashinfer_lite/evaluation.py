"""Comparing two sets of logits for the same ids: perplexity, top-1 agreement, near ties; and
the text they are measured on.

Used by the tests (against llama.cpp), calibration and the benchmarks; public so users can
check a backend.
"""

from __future__ import annotations

import functools
import pydoc_data.topics
from dataclasses import asdict, dataclass

import numpy as np


@functools.cache
def topics_text() -> str:
    """Real English text on every Python install: the pydoc topics, concatenated (~1 MB).
    Calibration reads its end, evaluations its beginning."""
    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def perplexity(logits: np.ndarray, ids) -> float:
    """Perplexity of ids[1:] given logits[:-1] (logits[i] predicts ids[i + 1])."""
    ids = np.asarray(ids)
    lp = log_softmax(logits[:-1])
    return float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))


@dataclass
class Agreement:
    positions: int
    ppl: float
    ppl_reference: float
    ppl_ratio: float
    top1_agreement: float
    disagreements: int
    max_reference_margin: float  # largest reference logit gap at a disagreement
    max_abs_logit_diff: float

    def as_dict(self) -> dict:
        return asdict(self)


def compare_logits(ours: np.ndarray, reference: np.ndarray, ids) -> Agreement:
    a, b = ours.argmax(-1), reference.argmax(-1)
    rows = np.nonzero(a != b)[0]
    margins = reference[rows, b[rows]] - reference[rows, a[rows]]
    p, pr = perplexity(ours, ids), perplexity(reference, ids)
    return Agreement(
        positions=len(ids), ppl=p, ppl_reference=pr, ppl_ratio=p / pr,
        top1_agreement=float((a == b).mean()), disagreements=int(len(rows)),
        max_reference_margin=float(margins.max()) if len(rows) else 0.0,
        max_abs_logit_diff=float(np.abs(ours - reference).max()),
    )
