"""Numeric ops of the transformer that are not weight matmuls, in float32 numpy.

These are cheap next to the matmuls (which a backend owns) and identical on every CPU backend.
"""

from __future__ import annotations

import numpy as np

_GELU_C = np.float32(np.sqrt(2.0 / np.pi))


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (..., d) scaled by 1/rms over the last axis, times weight (d,)."""
    ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(ms + eps))).astype(np.float32, copy=False) * weight


def silu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x * sigmoid(x); with `out`, computed there with no other temporary (the flash FFN's
    (T, ffn) gate of a prompt chunk is 9 MB a copy on the 1.5B)."""
    t = np.negative(x, out=out)
    np.exp(t, out=t)
    t += 1.0
    return np.divide(x, t, out=t)


def gelu_tanh(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    t = np.multiply(x, np.float32(0.044715), out=out)  # the operations in the formula's order
    t *= x
    t *= x
    t += x
    t *= _GELU_C
    np.tanh(t, out=t)
    t += 1.0
    t *= x
    t *= 0.5
    return t


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


def rope_tables(positions: np.ndarray, head_dim: int, base: float, scale: float = 1.0,
                freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (T, head_dim // 2) for integer positions (T,)."""
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors
    angles = (positions.astype(np.float64)[:, None] / scale) * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rope_type: str) -> np.ndarray:
    """Rotate x (T, heads, head_dim) by position; cos/sin (T, head_dim // 2)."""
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, D/2)
    if rope_type == "neox":  # pairs are (i, i + D/2)
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # "norm": adjacent pairs (2i, 2i + 1)
    out = np.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x2 * c + x1 * s
    return out


def visible(q_pos: np.ndarray, k_pos: np.ndarray, window: int | None) -> np.ndarray:
    """(T, S) bool: which keys each query sees (causal, and within a sliding window)."""
    mask = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    if window is not None:
        mask &= (q_pos[:, None] - k_pos[None, :]) < window
    return mask


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
              k_pos: np.ndarray, scale: float, window: int | None = None) -> np.ndarray:
    """Causal grouped-query attention.

    q (T, H, D) for query positions q_pos (T,); k, v (S, Hkv, D), any float dtype, for key
    positions k_pos (S,). A key is visible when k_pos <= q_pos and, with a sliding window,
    q_pos - k_pos < window. Returns (T, H * D) float32.
    """
    t, h, d = q.shape
    s, hkv, _ = k.shape
    g = h // hkv
    k = k.astype(np.float32, copy=False).transpose(1, 2, 0)  # (Hkv, D, S)
    v = v.astype(np.float32, copy=False).transpose(1, 0, 2)  # (Hkv, S, D)
    qg = q.reshape(t, hkv, g, d).transpose(1, 2, 0, 3).reshape(hkv, g * t, d)  # (Hkv, G*T, D)
    scores = np.matmul(qg, k) * np.float32(scale)  # (Hkv, G*T, S)
    scores = scores.reshape(hkv, g, t, s)
    if needs_mask(q_pos, k_pos, window):
        scores = np.where(visible(q_pos, k_pos, window)[None, None], scores,
                          np.float32(-np.inf))
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = np.matmul(scores.reshape(hkv, g * t, s), v)  # (Hkv, G*T, D)
    return out.reshape(hkv, g, t, d).transpose(2, 0, 1, 3).reshape(t, h * d)


def needs_mask(q_pos: np.ndarray, k_pos: np.ndarray, window: int | None) -> bool:
    """False when every query sees every key: one decoding query after its cached keys
    (with keys outside a sliding window already sliced off)."""
    return bool(len(q_pos) > 1 or k_pos[-1] > q_pos[0]
                or (window is not None and q_pos[-1] - k_pos[0] >= window))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def blockwise_attention(q: np.ndarray, blocks, q_pos: np.ndarray, scale: float,
                        window: int | None = None) -> np.ndarray:
    """Causal GQA over keys that arrive in blocks, with an online softmax (flash attention's
    running max and sum), so a quantized cache is dequantized one block at a time.

    q (T, H, D) at positions q_pos (T,); blocks: objects with .keys, .values (Hkv, S, D) float
    and .positions (S,). Returns (T, H * D) float32, as `attention` does.
    """
    t, h, d = q.shape
    hkv = None
    first_visible = int(q_pos[0]) - window + 1 if window is not None else None
    m = acc = denom = None
    for b in blocks:
        kp = b.positions
        if not len(kp) or (first_visible is not None and kp[-1] < first_visible):
            continue  # older than every query's window
        if hkv is None:
            hkv = b.keys.shape[0]
            g = h // hkv
            qg = q.reshape(t, hkv, g, d).transpose(1, 2, 0, 3).reshape(hkv, g * t, d)
            qg = qg * np.float32(scale)  # (Hkv, G*T, D): rows ordered (group, query)
            m = np.full((hkv, g * t, 1), -np.inf, np.float32)
            denom = np.zeros((hkv, g * t, 1), np.float32)
            acc = np.zeros((hkv, g * t, d), np.float32)
        k = b.keys.astype(np.float32, copy=False)
        s = np.matmul(qg, k.transpose(0, 2, 1))  # (Hkv, G*T, S)
        if needs_mask(q_pos, kp, window):
            # a row that sees nothing in this block gets -1e30, not -inf (no inf - inf NaN):
            # its bogus weights are wiped by the rescale once a visible key arrives (every
            # query sees at least itself, in the last block)
            s = np.where(np.tile(visible(q_pos, kp, window), (g, 1))[None], s,
                         np.float32(-1e30))
        m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
        s -= m_new
        np.exp(s, out=s)
        corr = np.exp(m - m_new)
        denom = denom * corr + s.sum(axis=-1, keepdims=True)
        acc = acc * corr + np.matmul(s, b.values.astype(np.float32, copy=False))
        m = m_new
    out = acc / denom  # (Hkv, G*T, D)
    return out.reshape(hkv, g, t, d).transpose(2, 0, 1, 3).reshape(t, h * d)
