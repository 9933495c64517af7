"""Attention on the MLX device: q/k norms, RoPE, the KV cache and softmax attention, so a decode
step never leaves the GPU between the embedding and the logits.

The device cache (cache/mlx.py) covers the default cache (kv_cache="f16", unbounded; Gemma 3's
sliding-window layers keep their window, as on the host). Quantized and bounded caches stay on
the host (cache/kv.py): the core then copies q/k/v back and runs the shared numpy core
(kernels/attention.py), which is correct and slower (one host round trip per layer).
"""

from __future__ import annotations

import numpy as np

from ..cache.kv import KVSpec
from ..cache.mlx import MlxKVCache
from .attention import AttentionCore
from .ops import visible

__all__ = ["MlxAttentionCore", "MlxKVCache", "device_cache_supports"]


def device_cache_supports(spec: KVSpec) -> bool:
    return spec.kind == "f16" and not spec.bounded


class MlxAttentionCore(AttentionCore):
    """AttentionCore on MLX arrays when the layer's cache is an MlxKVCache; otherwise the shared
    numpy core on host copies."""

    PREFILL_EVAL_EVERY = 3  # layers between evaluations in a prefill chunk (see __call__)

    def __init__(self, f, cfg, layer, backend):
        super().__init__(f, cfg, layer, backend)
        self.layer = layer
        mx = self.mx = backend.mx
        self._q_norm = None if self.q_norm is None else mx.array(self.q_norm)
        self._k_norm = None if self.k_norm is None else mx.array(self.k_norm)
        self._freqs = None
        if self.freq_factors is not None:  # MLX takes periods: 1 / (inv_freq / factors)
            d = cfg.head_dim
            periods = self.rope_base ** (np.arange(0, d, 2, dtype=np.float64) / d)
            self._freqs = mx.array((periods * self.freq_factors).astype(np.float32))

    def _rope_device(self, x, start: int):
        """x (1, heads, T, D) at positions start.. ; our `scale` divides positions."""
        c = self.cfg
        return self.mx.fast.rope(x, c.head_dim, traditional=c.rope_type != "neox",
                                 base=None if self._freqs is not None else self.rope_base,
                                 scale=1.0 / self.rope_scale, offset=start, freqs=self._freqs)

    def __call__(self, q, k, v, cache, positions: np.ndarray):
        if not isinstance(cache, MlxKVCache):
            host = self.backend.to_host
            return super().__call__(host(q), host(k), host(v), cache, positions)
        mx, c = self.mx, self.cfg
        t = q.shape[0]
        if t > 1 and self.layer % self.PREFILL_EVAL_EVERY == 0:
            # A prefill chunk: evaluate what the layers so far computed, every third layer.
            # Left lazy, a chunk's 18 layers go to the GPU as one graph whose temporaries
            # (256-row quantized matmuls, attention scores) are allocated before the first is
            # freed. Gemma 3, 1,024-token prompt, H200 (benchmarks/probe_mlx_prefill_chunks.py):
            # peak 548 MB lazy, 391 every third layer, 356 every layer; a 7,846-token prefill
            # 1.30 s lazy, 1.24 s every third layer, 1.46 s every layer.
            mx.eval(q, k, v)
        q = q.reshape(t, c.n_heads, c.head_dim).transpose(1, 0, 2)[None]  # (1, H, T, D)
        k = k.reshape(t, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)[None]  # (1, Hkv, T, D)
        v = v.reshape(t, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)[None]
        if self._q_norm is not None:
            q = mx.fast.rms_norm(q, self._q_norm, c.norm_eps)
            k = mx.fast.rms_norm(k, self._k_norm, c.norm_eps)
        start = int(positions[0])
        q, k = self._rope_device(q, start), self._rope_device(k, start)
        cache.update(k, v)
        keys, values, _ = cache.fetch()  # positions first_position .. offset - 1
        first = cache.first_position
        if self.window is not None and start - self.window + 1 > first:
            cut = start - self.window + 1 - first  # older than every query's window
            keys, values = keys[:, :, cut:], values[:, :, cut:]
            first += cut
        mask = None
        if t > 1 or self.window is not None and int(positions[-1]) - first >= self.window:
            mask = mx.array(visible(positions, np.arange(first, cache.offset), self.window))
        out = mx.fast.scaled_dot_product_attention(
            q, keys.astype(q.dtype), values.astype(q.dtype), scale=c.attn_scale, mask=mask)
        return out[0].transpose(1, 0, 2).reshape(t, c.n_heads * c.head_dim)  # (T, H*D)
