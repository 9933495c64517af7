"""Attention on the MLX device: q/k norms, RoPE, the KV cache and softmax attention, so a decode
step never leaves the GPU between the embedding and the logits.

The device cache covers the default cache (kv_cache="f16", unbounded; Gemma 3's sliding-window
layers keep their window, as on the host). Quantized and bounded caches stay on the host
(cache/kv.py): the core then copies q/k/v back and runs the shared numpy core, which is correct
and slower (one host round trip per layer).
"""

from __future__ import annotations

import numpy as np

from ..cache.kv import KVSpec, evictable, levelled, sliding_keep
from ..models.common import AttentionCore


def device_cache_supports(spec: KVSpec) -> bool:
    return spec.kind == "f16" and not spec.bounded


class MlxKVCache:
    """One layer's keys and values on the device: (1, Hkv, capacity, D) float16, grown in steps
    of 256 positions; `trim` moves the offset (cache/kv.py's interface, as far as model.py,
    the attention core and prompt-cache files use it).

    window: a sliding-window layer (Gemma 3's local layers) keeps only the last window - 1
    positions plus WINDOW_SLACK, dropping the oldest in whole EVICT_STEPs, like the host cache
    (cache/kv.py): the model masks anything older, so this is exact. Unbounded, Gemma 3's 15
    local layers held 15 KB per token of a 32k prompt (~470 MB) to attend to 512 of them."""

    STEP = 256

    def __init__(self, n_kv_heads: int, head_dim: int, mx, window: int | None = None):
        self.n_kv_heads, self.head_dim, self.mx = n_kv_heads, head_dim, mx
        self.window = window
        self.keys = self.values = None
        self.offset = 0  # the next token's position
        self.start = 0  # the position of the first held key

    @property
    def first_position(self) -> int:
        return self.start

    @property
    def held(self) -> int:
        return self.offset - self.start

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

    def _evict(self) -> None:
        """A sliding-window layer: drop the oldest positions past what the next queries need,
        in whole EVICT_STEPs, into new arrays (a slice would keep the old buffer alive)."""
        n = evictable(self.held, sliding_keep(self.window))
        if n == 0:
            return
        mx, keep = self.mx, self.held - n
        cap = -(-keep // self.STEP) * self.STEP
        keys, values = (mx.zeros((1, self.n_kv_heads, cap, self.head_dim), mx.float16)
                        for _ in range(2))
        keys[:, :, :keep] = self.keys[:, :, n : self.held]
        values[:, :, :keep] = self.values[:, :, n : self.held]
        mx.eval(keys, values)
        self.keys, self.values = keys, values
        self.start += n

    def update(self, k, v) -> None:
        """k, v: (1, Hkv, T, D) after RoPE."""
        if self.window is not None and self.keys is not None:
            self._evict()
        t = k.shape[2]
        held = self.held
        self._grow(held + t)
        self.keys[:, :, held : held + t] = k.astype(self.mx.float16)
        self.values[:, :, held : held + t] = v.astype(self.mx.float16)
        self.offset += t

    def fetch(self):
        """(1, Hkv, held, D) keys and values, float16, from position `first_position` on."""
        return self.keys[:, :, : self.held], self.values[:, :, : self.held]

    def trim(self, n: int) -> int:
        """Forget the last n positions. A window that has dropped positions the queries after
        the cut would need forgets everything (offset 0), as cache/kv.py does."""
        n = min(max(n, 0), self.offset)
        if self.start and n > self.held - (self.window - 1):
            dropped = self.offset
            self.reset()
            return dropped
        self.offset -= n
        return n

    def reset(self) -> None:
        self.keys = self.values = None
        self.offset = self.start = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def bytes_at(self, n_positions: int, chunk: int = 256) -> int:
        if self.window is not None:
            n_positions = levelled(n_positions, sliding_keep(self.window), chunk)
        rows = -(-n_positions // self.STEP) * self.STEP
        return 2 * rows * self.n_kv_heads * self.head_dim * 2

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The held positions as (S, Hkv, D) float16 host arrays (StandardKVCache's layout)
        and the position of the first ("start": a sliding window may have dropped some)."""
        start = np.array(self.start)
        if not self.held:
            empty = np.zeros((0, self.n_kv_heads, self.head_dim), np.float16)
            return {"keys": empty, "values": empty, "start": start}
        k, v = self.fetch()
        return {"keys": np.asarray(k[0]).transpose(1, 0, 2),  # (Hkv, S, D) -> (S, Hkv, D)
                "values": np.asarray(v[0]).transpose(1, 0, 2), "start": start}

    @state.setter
    def state(self, state: dict[str, np.ndarray]) -> None:
        self.reset()
        self.offset = self.start = int(state.get("start", 0))
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
        keys, values = cache.fetch()  # positions first_position .. offset - 1
        first = cache.first_position
        if self.window is not None and start - self.window + 1 > first:
            cut = start - self.window + 1 - first  # older than every query's window
            keys, values = keys[:, :, cut:], values[:, :, cut:]
            first += cut
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
