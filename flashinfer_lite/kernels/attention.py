"""Attention over a layer's KV cache: the core every CPU backend shares (q/k norms, RoPE, the
cache update) and `attend`, which picks the kernel for the kind of cache and the number of
queries. The caches (cache/) only store; a device backend supplies its own core
(kernels/mlx_attention.py).
"""

from __future__ import annotations

from functools import singledispatch

import numpy as np

from ..cache.base import KVCache
from ..cache.kv import StandardKVCache
from ..cache.quantized import QuantizedKVCache
from ..loaders.gguf_file import GGUFFile
from .base import Backend
from .ops import apply_rope, blockwise_attention, rms_norm, rope_tables
from .prefill_attention import dequantized, float_blocks, prefill_attention, view_blocks


def optional_dense(f: GGUFFile, name: str) -> np.ndarray | None:
    return f.dense(name) if name in f.tensors else None


@singledispatch
def attend(cache: KVCache, q: np.ndarray, q_pos: np.ndarray, scale: float,
           window: int | None, backend: Backend) -> np.ndarray:
    """Attention of q (T, H, D) at positions q_pos over what `cache` holds; (T, H * D) float32.
    Any cache: block by block over its dequantized blocks (online softmax)."""
    return blockwise_attention(q, cache.blocks(), q_pos, scale, window)


@attend.register
def _(cache: StandardKVCache, q, q_pos, scale, window, backend):
    # The store is one contiguous (S, Hkv, D) block: the backend's kernel reads it directly
    # (ORT's decode graph casts float16 vectorized; numpy would go element by element).
    # A chunk of queries: converted a block at a time, BLAS on one thread
    # (kernels/prefill_attention says why).
    keys, values, k_pos = cache.fetch()
    if window is not None and len(k_pos) and q_pos[0] - k_pos[0] >= window:
        first = int(q_pos[0] - window + 1 - k_pos[0])  # older than every query's window
        keys, values, k_pos = keys[first:], values[first:], k_pos[first:]
    if len(q_pos) > 1:
        # a few queries (a chat turn): the backend's one-call kernel if it has one
        out = backend.few_query_attention(q, keys, values, q_pos, k_pos, scale, window)
        if out is not None:
            return out
        blocks = float_blocks(keys, values, int(k_pos[0]))
        return prefill_attention(q, q_pos, blocks, scale, window)
    return backend.attention(q, keys, values, q_pos, k_pos, scale, window)


@attend.register
def _(cache: QuantizedKVCache, q, q_pos, scale, window, backend):
    view = cache.view()
    # one decoding query that sees every held key (no window cut): the backend's fused
    # kernel reads the codes directly; everything else goes block by block
    if (len(q_pos) == 1 and len(view.kq) and len(view.res_k)
            and (window is None or q_pos[0] - cache.first_position < window)):
        return backend.quantized_decode_attention(q, view, scale)
    # a few queries (a chat turn's new tokens): the whole cache dequantized once into one
    # float32 array, then the backend's one-call kernel (what a float32 cache would do)
    if len(q_pos) > 1 and backend.takes_few_queries(len(q_pos), q.shape[1], cache.held):
        keys, values = dequantized(view)
        return backend.few_query_attention(q, keys, values, q_pos, cache.positions, scale,
                                           window)
    # a chunk of queries (or a decode step with a window cut): dequantized a block at a
    # time, in position order - sinks, quantized store, residual
    return prefill_attention(q, q_pos, view_blocks(view, cache.first_position), scale, window)


class RopeTable:
    """cos, sin rows of one RoPE configuration, shared by the layers that use it, for one block
    of at least STEP positions at a time (recomputed when a call leaves it: once per STEP
    decoded tokens). A table of every position seen was 1 KB per position per layer at
    head_dim 256 (18 tables, 590 MB at 32k positions on Gemma 3, plus float64 temporaries
    whenever one grew); a block is 1 MB per configuration."""

    STEP = 1024

    def __init__(self, head_dim: int, base: float, scale: float, freq_factors):
        self.head_dim, self.base, self.scale = head_dim, base, scale
        self.freq_factors = freq_factors
        self.start = 0
        self.cos = self.sin = np.zeros((0, head_dim // 2), np.float32)

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (T, head_dim // 2) for integer positions (T,)."""
        lo, hi = int(positions.min()), int(positions.max()) + 1
        if lo < self.start or hi > self.start + len(self.cos):
            self.start = lo
            self.cos, self.sin = rope_tables(np.arange(lo, lo + max(self.STEP, hi - lo)),
                                             self.head_dim, self.base, self.scale,
                                             self.freq_factors)
        return self.cos[positions - self.start], self.sin[positions - self.start]


class AttentionCore:
    """One layer's attention after the projections: q/k RMSNorm, RoPE, cache, softmax.
    cfg: the model's config.ModelConfig."""

    def __init__(self, f: GGUFFile, cfg, layer: int, backend: Backend,
                 rope_tables: dict | None = None):
        """rope_tables: {(base, scale): RopeTable} shared by a model's layers (None: own)."""
        p = f"blk.{layer}."
        self.cfg, self.backend = cfg, backend
        self.q_norm = optional_dense(f, p + "attn_q_norm.weight")
        self.k_norm = optional_dense(f, p + "attn_k_norm.weight")
        sliding = cfg.is_sliding(layer)
        self.window = cfg.sliding_window if sliding else None
        self.rope_base = cfg.rope_base_local if sliding and cfg.rope_base_local else cfg.rope_base
        # Linear RoPE scaling applies to the global layers only (llama.cpp: freq_scale_swa = 1).
        self.rope_scale = 1.0 if sliding else cfg.rope_scale
        self.freq_factors = optional_dense(f, "rope_freqs.weight")  # Llama 3.1 long-context
        tables = {} if rope_tables is None else rope_tables
        key = (self.rope_base, self.rope_scale)
        if key not in tables:
            tables[key] = RopeTable(cfg.head_dim, self.rope_base, self.rope_scale,
                                    self.freq_factors)
        self._rope_table = tables[key]

    def _rope(self, positions: np.ndarray):
        return self._rope_table.rows(positions)

    def shift_keys(self, k: np.ndarray, delta: int) -> np.ndarray:
        """Keys (n, Hkv, D) rotated by RoPE at some positions -> at those positions + delta
        (rotations compose), for a bounded cache that re-positions its attention sinks."""
        cos, sin = rope_tables(np.full(len(k), delta), self.cfg.head_dim, self.rope_base,
                               self.rope_scale, self.freq_factors)
        return apply_rope(k, cos, sin, self.cfg.rope_type)

    def rotate(self, q, k, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Projected q (T, H*D), k (T, Hkv*D) -> q (T, H, D), k (T, Hkv, D) after the q/k norms
        and RoPE at `positions`: what attention scores (also the token filter's input)."""
        c = self.cfg
        t = q.shape[0]
        q = q.reshape(t, c.n_heads, c.head_dim)  # (T, H, D)
        k = k.reshape(t, c.n_kv_heads, c.head_dim)  # (T, Hkv, D)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, c.norm_eps)
            k = rms_norm(k, self.k_norm, c.norm_eps)
        cos, sin = self._rope(positions)
        qk = apply_rope(np.concatenate([q, k], axis=1), cos, sin, c.rope_type)  # (T, H+Hkv, D)
        return qk[:, : c.n_heads], qk[:, c.n_heads :]

    def rotate_keys(self, k, positions: np.ndarray) -> np.ndarray:
        """Projected k (T, Hkv*D) -> (T, Hkv, D) after the k norm and RoPE: rotate's keys alone
        (the token filter scores every key but only the last query)."""
        c = self.cfg
        k = k.reshape(len(k), c.n_kv_heads, c.head_dim)  # (T, Hkv, D)
        if self.k_norm is not None:
            k = rms_norm(k, self.k_norm, c.norm_eps)
        cos, sin = self._rope(positions)
        return apply_rope(k, cos, sin, c.rope_type)

    def __call__(self, q, k, v, cache: KVCache, positions: np.ndarray) -> np.ndarray:
        c = self.cfg
        q, k = self.rotate(q, k, positions)
        v = v.reshape(q.shape[0], c.n_kv_heads, c.head_dim)  # (T, Hkv, D)
        cache.update(k, v)
        return attend(cache, q, positions, c.attn_scale, self.window, self.backend)
