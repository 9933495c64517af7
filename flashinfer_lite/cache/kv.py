"""The host KV caches: what load() asks for (KVSpec), float storage (StandardKVCache), and
building a model's caches. The interface and the rules of what is held: cache/base.py; q8/q4
storage: cache/quantized.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError
from .base import EVICT_STEP, WINDOW_SLACK, KVCache, RopeShift, grown
from .quantized import QuantizedKVCache

__all__ = ["EVICT_STEP", "KV_KINDS", "WINDOW_SLACK", "KVSpec", "StandardKVCache",
           "make_kv_cache", "make_kv_caches"]

KV_KINDS = ("f16", "f32", "q8", "q4")


@dataclass(frozen=True)
class KVSpec:
    """What kind of cache a model builds for its layers (the load() options)."""

    kind: str = "f16"  # "f16" | "f32" | "q8" | "q4"
    window: int | None = None  # bounded cache: recent positions kept (None = unbounded)
    sinks: int = 4  # bounded cache: first positions always kept (attention sinks)
    residual: int = 128  # q8/q4: most recent positions kept in full precision
    key_group: int = EVICT_STEP  # q8/q4: tokens per key group (a divisor of EVICT_STEP)

    def __post_init__(self):
        if self.kind not in KV_KINDS:
            raise InvalidArgumentError(
                f"kv_cache must be one of {', '.join(KV_KINDS)}; got {self.kind!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise InvalidArgumentError(f"kv_window must be a positive integer; got {self.window!r}")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise InvalidArgumentError(f"kv_sinks must be an integer >= 0; got {self.sinks!r}")
        if not isinstance(self.residual, int) or self.residual < EVICT_STEP:
            raise InvalidArgumentError(
                f"kv_residual must be an integer >= {EVICT_STEP} (one quantization group); "
                f"got {self.residual!r}")
        if not isinstance(self.key_group, int) or self.key_group < 1 or (
                EVICT_STEP % self.key_group):
            raise InvalidArgumentError(
                f"kv key_group must divide {EVICT_STEP}; got {self.key_group!r}")
        if self.window is not None and self.quantized and self.window < self.residual:
            raise InvalidArgumentError(
                f"kv_window ({self.window}) must be at least kv_residual ({self.residual}) "
                f"with a quantized cache")

    @property
    def quantized(self) -> bool:
        return self.kind in ("q8", "q4")

    @property
    def bounded(self) -> bool:
        return self.window is not None


class StandardKVCache(KVCache):
    """Keys and values kept whole, in float16 (kv_cache="f16") or float32."""

    STEP = 256

    def __init__(self, n_kv_heads: int, head_dim: int, dtype=np.float16, **bounds):
        super().__init__(n_kv_heads, head_dim, **bounds)
        self.dtype = np.dtype(dtype)
        self._shown_shift = 0  # the sink shift the rows [0, sinks) were last written with
        # (capacity, Hkv, D): position-major, so the held rows are one contiguous block that
        # the ORT decode kernel reads without a copy. With sinks, rows [0, sinks) hold the
        # shown (re-rotated) sink keys, rewritten when the shift changes.
        self.keys: np.ndarray | None = None
        self.values: np.ndarray | None = None

    def _grow(self, needed: int) -> None:
        capacity = 0 if self.keys is None else self.keys.shape[0]
        if needed <= capacity:
            return
        shape = (grown(needed, self.STEP), self.n_kv_heads, self.head_dim)
        keys, values = np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)
        if self.keys is not None:
            rows = self.held
            keys[:rows] = self.keys[:rows]
            values[:rows] = self.values[:rows]
        self.keys, self.values = keys, values

    def update(self, k, v):
        super().update(k, v)
        if len(self._sink_k) and self._shown_shift != self.start - len(self._sink_k):
            self._write_sinks()

    def _write_sinks(self):
        s = len(self._sink_k)
        self._grow(s)
        sk, sv = self._shown_sinks()
        self.keys[:s], self.values[:s] = sk, sv
        self._shown_shift = self.start - s

    def _append(self, k, v):
        if len(self._sink_k) and self.keys is None:
            self._write_sinks()
        rows = self.held
        t = k.shape[0]
        self._grow(rows + t)
        self.keys[rows : rows + t] = k
        self.values[rows : rows + t] = v

    def _drop_front(self, n):
        s, rows = len(self._sink_k), self.held
        self.keys[s : rows - n] = self.keys[s + n : rows]
        self.values[s : rows - n] = self.values[s + n : rows]

    def _drop_back(self, n):
        pass  # the held row count follows offset

    def _clear(self):
        self.keys = self.values = None
        self._shown_shift = 0

    def _recent_blocks(self):
        if self.keys is None:
            return
        s, rows = len(self._sink_k), self.held
        if rows > s:
            yield (self.keys[s:rows].transpose(1, 0, 2),  # (S, Hkv, D) -> (Hkv, S, D)
                   self.values[s:rows].transpose(1, 0, 2))

    def fetch(self):
        if self.keys is None or not self.held:
            return super().fetch()
        rows = self.held
        if len(self._sink_k) and self._shown_shift != self.start - len(self._sink_k):
            self._write_sinks()
        return self.keys[:rows], self.values[:rows], self.positions

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def bytes_for(self, n):
        rows = grown(n + len(self._sink_k), self.STEP) if n else 0
        return 2 * rows * self.n_kv_heads * self.head_dim * self.dtype.itemsize

    def _storage_state(self):
        if self.keys is None:
            empty = np.zeros((0, self.n_kv_heads, self.head_dim), self.dtype)
            return {"keys": empty, "values": empty}
        rows = self.held
        return {"keys": self.keys[:rows], "values": self.values[:rows]}

    def _load_storage_state(self, state):
        keys, values = state["keys"], state["values"]
        self.keys = self.values = None
        if len(keys):
            self._grow(len(keys))
            self.keys[: len(keys)], self.values[: len(keys)] = keys, values
        self._shown_shift = self.start - len(self._sink_k)


KV_DTYPES = {"f16": np.float16, "f32": np.float32}


def make_kv_cache(spec: KVSpec, n_kv_heads: int, head_dim: int,
                  sliding_window: int | None = None,
                  rope_shift: RopeShift | None = None) -> KVCache:
    """One layer's cache. A sliding-window layer keeps only its window (exactly what the model
    attends to), unless the user's bounded window is smaller."""
    if sliding_window is not None and (spec.window is None or spec.window >= sliding_window):
        bounds = dict(window=sliding_window, sinks=0, exact=True)
    elif spec.window is not None:
        bounds = dict(window=spec.window, sinks=spec.sinks, rope_shift=rope_shift)
    else:
        bounds = {}
    if spec.quantized:
        return QuantizedKVCache(n_kv_heads, head_dim, bits=int(spec.kind[1:]),
                                residual=spec.residual, group=spec.key_group, **bounds)
    return StandardKVCache(n_kv_heads, head_dim, KV_DTYPES[spec.kind], **bounds)


def make_kv_caches(spec: KVSpec | str, n_layers: int, n_kv_heads: int, head_dim: int,
                   sliding_windows=None, rope_shifts=None) -> list[KVCache]:
    """A cache per layer; sliding_windows / rope_shifts: per-layer lists (None entries allowed)."""
    spec = spec if isinstance(spec, KVSpec) else KVSpec(spec)
    windows = sliding_windows or [None] * n_layers
    shifts = rope_shifts or [None] * n_layers
    return [make_kv_cache(spec, n_kv_heads, head_dim, windows[i], shifts[i])
            for i in range(n_layers)]

