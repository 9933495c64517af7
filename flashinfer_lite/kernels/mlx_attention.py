"""Attention on the MLX device: q/k norms, RoPE, the KV cache and softmax attention, so a decode
step never leaves the GPU between the embedding and the logits.

The device cache covers the default cache (kv_cache="f16", unbounded; Gemma 3's sliding-window
layers keep every position and mask the old ones). Quantized and bounded caches stay on the host
(cache/kv.py): the core then copies q/k/v back and runs the shared numpy core, which is correct
and slower (one host round trip per layer).
"""

from __future__ import annotations

import numpy as np

from ..cache.kv import KVSpec
from ..models.common import AttentionCore


def device_cache_supports(spec: KVSpec) -> bool:
    return spec.kind == "f16" and not spec.bounded


class MlxKVCache:
    """One layer's keys and values on the device: (1, Hkv, capacity, D) float16, grown in steps
    of 256 positions; `trim` moves the offset (cache/kv.py's interface, as far as model.py,
    the attention core and prompt-cache files use it)."""

    STEP = 256

    def __init__(self, n_kv_heads: int, head_dim: int, mx):
        self.n_kv_heads, self.head_dim, self.mx = n_kv_heads, head_dim, mx
        self.keys = self.values = None
        self.offset = 0

    @property
    def first_position(self) -> int:
        return 0

    def _grow(self, needed: int) -> None:
        mx = self.mx
        cap = 0 if self.keys is None else self.keys.shape[2]
        if needed <= cap:
            return
        new_cap = -(-needed // self.STEP) * self.STEP
        shape = (1, self.n_kv_heads, new_cap - cap, self.head_dim)
        extra = mx.zeros(shape, mx.float16)
        if self.keys is None:
            self.keys, self.values = extra, mx.zeros(shape, mx.float16)
        else:
            self.keys = mx.concatenate([self.keys, extra], axis=2)
            self.values = mx.concatenate([self.values, mx.zeros(shape, mx.float16)], axis=2)
            # MLX is lazy: without this, a long prefill is one graph over every chunk (each
            # chunk's cache a new array), held until the logits are read. Evaluating here,
            # once per STEP positions, bounds it at about one chunk.
            mx.eval(self.keys, self.values)

    def update(self, k, v) -> None:
        """k, v: (1, Hkv, T, D) after RoPE."""
        t = k.shape[2]
        self._grow(self.offset + t)
        self.keys[:, :, self.offset : self.offset + t] = k.astype(self.mx.float16)
        self.values[:, :, self.offset : self.offset + t] = v.astype(self.mx.float16)
        self.offset += t

    def fetch(self):
        """(1, Hkv, offset, D) keys and values, float16."""
        return self.keys[:, :, : self.offset], self.values[:, :, : self.offset]

    def trim(self, n: int) -> int:
        n = min(max(n, 0), self.offset)
        self.offset -= n
        return n

    def reset(self) -> None:
        self.keys = self.values = None
        self.offset = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def bytes_at(self, n_positions: int, chunk: int = 256) -> int:
        rows = -(-n_positions // self.STEP) * self.STEP
        return 2 * rows * self.n_kv_heads * self.head_dim * 2

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The held positions as (S, Hkv, D) float16 host arrays (StandardKVCache's layout)."""
        if not self.offset:
            empty = np.zeros((0, self.n_kv_heads, self.head_dim), np.float16)
            return {"keys": empty, "values": empty}
        k, v = self.fetch()
        return {"keys": np.asarray(k[0]).transpose(1, 0, 2),  # (Hkv, S, D) -> (S, Hkv, D)
                "values": np.asarray(v[0]).transpose(1, 0, 2)}

    @state.setter
    def state(self, state: dict[str, np.ndarray]) -> None:
        self.reset()
        keys = state["keys"]
        if len(keys):
            mx = self.mx
            self.update(mx.array(keys.transpose(1, 0, 2)[None]),  # (S, Hkv, D) -> (1, Hkv, S, D)
                        mx.array(state["values"].transpose(1, 0, 2)[None]))


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
        keys, values = cache.fetch()
        first = 0
        if self.window is not None and start - self.window + 1 > 0:
            first = start - self.window + 1  # older than every query's window
            keys, values = keys[:, :, first:], values[:, :, first:]
        mask = None
        if t > 1 or self.window is not None and int(positions[-1]) - first >= self.window:
            k_pos = np.arange(first, cache.offset)
            visible = k_pos[None, :] <= positions[:, None]  # (T, S)
            if self.window is not None:
                visible &= (positions[:, None] - k_pos[None, :]) < self.window
            mask = mx.array(visible)
        out = mx.fast.scaled_dot_product_attention(
            q, keys.astype(q.dtype), values.astype(q.dtype), scale=c.attn_scale, mask=mask)
        return out[0].transpose(1, 0, 2).reshape(t, c.n_heads * c.head_dim)  # (T, H*D)
