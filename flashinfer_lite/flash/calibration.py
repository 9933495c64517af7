"""Calibration: which FFN neurons fire on real text, and how much each one contributes.

The model runs dense on calibration text with a recording FFN (float32, from `gguf`'s
dequantizers). Per layer and neuron i, with a = act(gate_i . h), u = up_i . h:
  contribution c_i = |a * u| * ||down column i||      (what skipping i costs, to first order)
  weight w_i       = mean |u_i| * ||down column i||    (turns the exact gate's |a| into a
                                                        predicted contribution without reading i)
  hotness          = how often i is in a token's top half by c (neurons are stored hot-first)
and the skip thresholds on the predicted score s_i = |a_i| * w_i at several skip fractions.
"""

from __future__ import annotations

import numpy as np

from ..cache.kv import KVSpec
from ..config import ModelConfig
from ..evaluation import topics_text
from ..kernels.base import default_threads
from ..kernels.onnxruntime_backend import OnnxRuntimeBackend
from ..kernels.ops import ACTIVATIONS
from ..models import build_model
from ..tokenizer import Tokenizer

SKIP_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def calibration_ids(tokenizer, n_tokens: int) -> list[int]:
    """Tokens from the END of the pydoc topics (evaluation uses the beginning)."""
    text = topics_text()
    ids = tokenizer.encode(text[-16 * n_tokens:], add_bos=False)
    return ids[-n_tokens:]


class RecordingFFN:
    """A dense float32 FFN that records per-neuron statistics as it runs."""

    def __init__(self, f, cfg):
        self.f, self.cfg = f, cfg
        self.act = ACTIVATIONS[cfg.activation]
        n, k = cfg.n_layers, cfg.ffn_dim
        self.hot = np.zeros((n, k))
        self.abs_u = np.zeros((n, k))
        self.down_norm = np.zeros((n, k))
        self.scores: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.contrib: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.tokens = 0

    def __call__(self, layer: int, h: np.ndarray) -> np.ndarray:
        p = f"blk.{layer}."
        wg, wu = self.f.dense(p + "ffn_gate.weight"), self.f.dense(p + "ffn_up.weight")
        wd = self.f.dense(p + "ffn_down.weight")  # (d, ffn)
        a, u = self.act(h @ wg.T), h @ wu.T  # (T, ffn) each
        dn = np.linalg.norm(wd, axis=0)  # (ffn,)
        c = np.abs(a * u) * dn
        half = np.median(c, axis=1, keepdims=True)
        self.hot[layer] += (c >= half).sum(0)
        self.abs_u[layer] += np.abs(u).sum(0)
        self.down_norm[layer] = dn
        self.scores[layer].append(np.abs(a))
        self.contrib[layer].append(c)
        if layer == 0:
            self.tokens += h.shape[0]
        return (a * u) @ wd.T

    def result(self) -> dict:
        order, weight, thresholds, recall = [], [], [], []
        for i in range(self.cfg.n_layers):
            w = self.abs_u[i] / max(self.tokens, 1) * self.down_norm[i]
            s = np.concatenate(self.scores[i]) * w  # (T, ffn) predicted contribution
            c = np.concatenate(self.contrib[i])
            order.append(np.argsort(-self.hot[i], kind="stable"))
            weight.append(w)
            th = {p: float(np.quantile(s, p)) for p in SKIP_FRACTIONS}
            thresholds.append(th)
            # share of the true contribution mass kept by the predicted set, per skip fraction
            recall.append({p: float((c * (s >= th[p])).sum() / c.sum()) for p in SKIP_FRACTIONS})
        mean_recall = {str(p): float(np.mean([r[p] for r in recall])) for p in SKIP_FRACTIONS}
        return {"order": order, "weight": weight, "thresholds": thresholds,
                "info": {"tokens": self.tokens, "contribution_mass_kept": mean_recall}}


def calibrate(f, n_tokens: int = 512) -> dict:
    """Run the dense model over n_tokens of calibration text and return the statistics."""
    cfg = ModelConfig.from_gguf(f)
    rec = RecordingFFN(f, cfg)
    net = build_model(f, OnnxRuntimeBackend(default_threads()), cfg, ffn=rec)
    ids = calibration_ids(Tokenizer(f.path), n_tokens)
    caches = net.make_cache(KVSpec("f16"))
    for s in range(0, len(ids), 256):
        net.forward(np.asarray(ids[s : s + 256]), caches)
    return {**rec.result(), "token_order": token_order(f, cfg.vocab_size)}


def token_order(f, vocab_size: int, chars: int = 400_000) -> np.ndarray:
    """(V,) token ids, most frequent first on calibration text (ties by id), for the hot-first
    vocabulary rows on flash."""
    ids = Tokenizer(f.path).encode(topics_text()[-chars:], add_bos=False)
    counts = np.bincount(np.asarray(ids, np.int64), minlength=vocab_size)[:vocab_size]
    return np.argsort(-counts, kind="stable").astype(np.int32)
