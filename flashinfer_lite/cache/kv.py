"""KV caches: one interface (update_and_fetch / offset / trim / nbytes / state), only KV heads.

Attention calls `cache.update_and_fetch(k, v)` with the new tokens' keys and values and gets back
everything cached so far; `offset` is the number of positions cached. Storage grows in blocks of
`STEP` positions so a decode step never reallocates, and `trim(n)` only moves the offset.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..errors import InvalidArgumentError


class KVCache(ABC):
    """The cache of one attention layer."""

    offset: int

    @abstractmethod
    def update_and_fetch(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append k, v (T, Hkv, D); return all cached keys and values (S, Hkv, D), contiguous,
        in the stored dtype (attention kernels convert as they read)."""

    @abstractmethod
    def trim(self, n: int) -> int:
        """Forget the last n positions; returns how many were dropped."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of storage held (allocated), not just used."""

    @property
    @abstractmethod
    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """The cached keys and values (offset, Hkv, D), in their stored dtype."""


class StandardKVCache(KVCache):
    """Keys and values kept whole, in float16 (kv_cache="f16") or float32."""

    STEP = 256

    def __init__(self, n_kv_heads: int, head_dim: int, dtype=np.float16):
        self.n_kv_heads, self.head_dim, self.dtype = n_kv_heads, head_dim, np.dtype(dtype)
        # (capacity, Hkv, D): position-major, so the first `offset` rows are one contiguous
        # block that attention kernels can read without a copy
        self.keys: np.ndarray | None = None
        self.values: np.ndarray | None = None
        self.offset = 0

    def _grow(self, needed: int) -> None:
        capacity = 0 if self.keys is None else self.keys.shape[0]
        if needed <= capacity:
            return
        new_cap = ((needed + self.STEP - 1) // self.STEP) * self.STEP
        shape = (new_cap, self.n_kv_heads, self.head_dim)
        keys, values = np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)
        if self.keys is not None:
            keys[: self.offset] = self.keys[: self.offset]
            values[: self.offset] = self.values[: self.offset]
        self.keys, self.values = keys, values

    def update_and_fetch(self, k, v):
        t = k.shape[0]
        self._grow(self.offset + t)
        self.keys[self.offset : self.offset + t] = k
        self.values[self.offset : self.offset + t] = v
        self.offset += t
        return self.keys[: self.offset], self.values[: self.offset]

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self):
        if self.keys is None:
            empty = np.zeros((0, self.n_kv_heads, self.head_dim), self.dtype)
            return empty, empty
        return self.keys[: self.offset], self.values[: self.offset]


KV_DTYPES = {"f16": np.float16, "f32": np.float32}


def make_kv_caches(kind: str, n_layers: int, n_kv_heads: int, head_dim: int) -> list[KVCache]:
    if kind not in KV_DTYPES:
        raise InvalidArgumentError(
            f"kv_cache must be one of {', '.join(KV_DTYPES)}; got {kind!r}"
        )
    return [StandardKVCache(n_kv_heads, head_dim, KV_DTYPES[kind]) for _ in range(n_layers)]
