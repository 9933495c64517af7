"""The KV cache on the MLX device (kernels/mlx_attention.py attends over it): the default cache
(kv_cache="f16", unbounded; Gemma 3's sliding-window layers keep their window, as on the host).
Quantized and bounded caches stay on the host (cache/kv.py, cache/quantized.py).

It is a KVCache (cache/base.py): the same rules of what is held, the same trim and the same
`state` as the host's float16 cache, so a prompt-cache file moves between the two. MLX itself is
not imported here: the backend hands its module in.
"""

from __future__ import annotations

import numpy as np

from .base import KVCache, grown


class MlxKVCache(KVCache):
    """One layer's keys and values on the device: (1, Hkv, capacity, D) float16, grown in steps
    of 256 positions; `trim` moves the offset.

    window: a sliding-window layer (Gemma 3's local layers) keeps only the last window - 1
    positions plus WINDOW_SLACK, dropping the oldest in whole EVICT_STEPs, like the host cache:
    the model masks anything older, so this is exact. Unbounded, Gemma 3's 15 local layers held
    15 KB per token of a 32k prompt (~470 MB) to attend to 512 of them."""

    STEP = 256

    def __init__(self, n_kv_heads: int, head_dim: int, mx, window: int | None = None):
        super().__init__(n_kv_heads, head_dim, window=window, exact=window is not None)
        self.mx = mx
        self.keys = self.values = None

    def update(self, k, v) -> None:
        """k, v: (1, Hkv, T, D) MLX arrays after RoPE."""
        self._append_recent(k, v, k.shape[2])

    def fetch(self):
        """(1, Hkv, held, D) keys and values, float16, and their positions (held,)."""
        held = self.held
        return self.keys[:, :, :held], self.values[:, :, :held], self.positions

    def _grow(self, needed: int) -> None:
        mx = self.mx
        cap = 0 if self.keys is None else self.keys.shape[2]
        if needed <= cap:
            return
        shape = (1, self.n_kv_heads, grown(needed, self.STEP) - cap, self.head_dim)
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

    def _append(self, k, v) -> None:
        held, t = self.held, k.shape[2]
        self._grow(held + t)
        self.keys[:, :, held : held + t] = k.astype(self.mx.float16)
        self.values[:, :, held : held + t] = v.astype(self.mx.float16)

    def _drop_front(self, n: int) -> None:
        """Into new arrays: a slice would keep the old buffer alive."""
        mx, keep = self.mx, self.held - n
        keys, values = (mx.zeros((1, self.n_kv_heads, grown(keep, self.STEP), self.head_dim),
                                 mx.float16) for _ in range(2))
        keys[:, :, :keep] = self.keys[:, :, n : self.held]
        values[:, :, :keep] = self.values[:, :, n : self.held]
        mx.eval(keys, values)
        self.keys, self.values = keys, values

    def _drop_back(self, n: int) -> None:
        pass  # the held count follows offset

    def _clear(self) -> None:
        self.keys = self.values = None

    def _recent_blocks(self):
        if self.held:
            keys, values, _ = self.fetch()
            yield np.asarray(keys[0], np.float32), np.asarray(values[0], np.float32)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def bytes_for(self, n: int) -> int:
        return 2 * grown(n, self.STEP) * self.n_kv_heads * self.head_dim * 2

    def _storage_state(self) -> dict[str, np.ndarray]:
        """The held positions as (S, Hkv, D) float16 host arrays (the host cache's layout)."""
        if not self.held:
            empty = np.zeros((0, self.n_kv_heads, self.head_dim), np.float16)
            return {"keys": empty, "values": empty}
        keys, values, _ = self.fetch()
        return {"keys": np.asarray(keys[0]).transpose(1, 0, 2),  # (Hkv, S, D) -> (S, Hkv, D)
                "values": np.asarray(values[0]).transpose(1, 0, 2)}

    def _load_storage_state(self, state: dict[str, np.ndarray]) -> None:
        keys, values, mx = state["keys"], state["values"], self.mx
        n = len(keys)
        if n:
            self._grow(n)
            self.keys[:, :, :n] = mx.array(keys.transpose(1, 0, 2)[None])  # (1, Hkv, S, D)
            self.values[:, :, :n] = mx.array(values.transpose(1, 0, 2)[None])
