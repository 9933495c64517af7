"""KV caches: one interface (update, fetch, attend, offset, trim, nbytes, state), KV heads only.

Attention calls `cache.update(k, v)` with the new tokens' keys (already rotated by RoPE) and
values, then `cache.attend(q, ...)`; `update_and_fetch` is the two in one for callers that want
the arrays. `offset` is the position of the next token: every position seen so far, including
ones a bounded cache has dropped.

Which positions a cache holds (and so what attention sees):
- unbounded: every position 0 .. offset-1;
- a sliding-window layer (Gemma 3's local layers): the last `window` positions (plus slack, so
  a chunk of new queries and a small trim still see a full window) - exact, the mask does the rest;
- bounded (StreamingLLM): `sinks` first positions plus at least `window` recent ones. The sink
  keys are re-rotated to sit right before the recent ones (see `_shown_sinks`), so the held
  positions are always one contiguous range ending at offset-1 and attention needs no special
  case: queries keep their true positions, relative distances stay <= sinks + window + slack.

Storage grows in blocks and `trim(n)` moves the offset (a quantized store first hands the
partial group it cuts back to the full-precision residual).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError

KV_KINDS = ("f16", "f32", "q8", "q4")
EVICT_STEP = 128  # a bounded cache drops positions in whole groups of this many (= key group)
WINDOW_SLACK = 128  # extra positions a sliding-window cache keeps, so small trims stay exact

# (k (n, Hkv, D) float32, delta) -> k rotated by delta more positions (RoPE composes additively)
RopeShift = Callable[[np.ndarray, int], np.ndarray]


def sliding_keep(window: int) -> int:
    """Recent positions a sliding-window layer keeps before appending: window - 1 for the next
    query, plus slack so a small trim stays exact (the host caches and kernels/mlx_attention's)."""
    return window - 1 + WINDOW_SLACK


def evictable(held: int, keep: int) -> int:
    """Oldest positions to drop from `held` recent ones: what exceeds `keep`, in whole
    EVICT_STEPs (so a quantized store drops whole key groups)."""
    return max(0, (held - keep) // EVICT_STEP * EVICT_STEP)


def levelled(n_positions: int, keep: int, chunk: int) -> int:
    """Recent positions a windowed cache may hold after n_positions fed in chunks of at most
    `chunk`: it levels off at keep + one eviction step + a chunk (for budgets)."""
    return min(n_positions, keep + EVICT_STEP - 1 + chunk)


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


@dataclass
class KVBlock:
    """A stretch of held positions, dequantized: keys/values (Hkv, S, D) float, positions (S,)."""

    keys: np.ndarray
    values: np.ndarray
    positions: np.ndarray


class KVCache(ABC):
    """The cache of one attention layer. Subclasses store; this class decides what is held.

    window/exact: keep at least `window` recent positions; exact=True is a sliding-window layer
    (the model masks anything older, so nothing it needs is ever dropped), exact=False a bounded
    cache with `sinks` sink positions (StreamingLLM). rope_shift re-rotates sink keys.
    """

    def __init__(self, n_kv_heads: int, head_dim: int, window: int | None = None,
                 sinks: int = 0, exact: bool = False, rope_shift: RopeShift | None = None):
        if window is not None and sinks and rope_shift is None:
            raise InvalidArgumentError("a cache with attention sinks needs rope_shift")
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.window, self.exact, self.rope_shift = window, exact, rope_shift
        self.sinks = sinks if window is not None else 0
        self.offset = 0  # the next token's position
        self.start = 0  # first held non-sink position (> sinks once something was evicted)
        # sink keys as RoPE rotated them at positions 0..sinks-1, float32 (sinks, Hkv, D)
        self._sink_k = np.zeros((0, n_kv_heads, head_dim), np.float32)
        self._sink_v = np.zeros((0, n_kv_heads, head_dim), np.float32)
        self._shown_shift = 0

    # ---- what subclasses store ----------------------------------------------------------------
    @abstractmethod
    def _append(self, k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v (T, Hkv, D) float32 after the held recent positions."""

    @abstractmethod
    def _drop_front(self, n: int) -> None:
        """Forget the n oldest recent positions (n a multiple of EVICT_STEP)."""

    @abstractmethod
    def _drop_back(self, n: int) -> None:
        """Forget the n newest recent positions."""

    @abstractmethod
    def _recent_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The held recent positions in order, as (keys, values) (Hkv, S, D) float blocks."""

    @abstractmethod
    def _clear(self) -> None:
        """Drop all storage."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of storage held (allocated), not just used."""

    @abstractmethod
    def bytes_for(self, n: int) -> int:
        """Bytes this cache would hold with n recent positions stored (for budget checks)."""

    @abstractmethod
    def _storage_state(self) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _load_storage_state(self, state: dict[str, np.ndarray]) -> None: ...

    # ---- the interface attention uses ------------------------------------------------------------
    @property
    def held(self) -> int:
        """Positions held (sinks + recent)."""
        return len(self._sink_k) + self.offset - self.start

    @property
    def first_position(self) -> int:
        """Position (as attention sees it) of the first held key."""
        return self.offset - self.held

    def update(self, k: np.ndarray, v: np.ndarray) -> None:
        """Append the new tokens' k, v (T, Hkv, D) (keys already rotated at their positions)."""
        k = np.asarray(k, np.float32)
        v = np.asarray(v, np.float32)
        if self.window is not None:
            take = max(0, min(len(k), self.sinks - len(self._sink_k)))
            if take:  # the first positions ever seen become the sinks
                self._sink_k = np.concatenate([self._sink_k, k[:take]])
                self._sink_v = np.concatenate([self._sink_v, v[:take]])
                self.offset += take
                self.start = self.offset
                k, v = k[take:], v[take:]
            self._evict()
        if len(k):
            self._append(k, v)
            self.offset += len(k)

    def _keep(self) -> int:
        """Recent positions to keep before appending: a sliding layer keeps window - 1 for the
        next query, plus slack so a small trim stays exact."""
        return sliding_keep(self.window) if self.exact else self.window

    def _evict(self) -> None:
        n = evictable(self.offset - self.start, self._keep())
        if n > 0:
            self._drop_front(n)
            self.start += n

    def _shown_sinks(self) -> tuple[np.ndarray, np.ndarray]:
        """Sink keys rotated to the positions just before `start` (StreamingLLM's re-positioning:
        queries then see sinks + window as one contiguous stretch)."""
        shift = self.start - len(self._sink_k)
        if shift and self.rope_shift is not None:
            return self.rope_shift(self._sink_k, shift), self._sink_v
        return self._sink_k, self._sink_v

    def blocks(self) -> Iterator[KVBlock]:
        """Every held position in order, as dequantized blocks with their positions."""
        pos = self.first_position
        if len(self._sink_k):
            sk, sv = self._shown_sinks()
            n = len(sk)
            yield KVBlock(sk.transpose(1, 0, 2), sv.transpose(1, 0, 2),  # (Hkv, S, D)
                          np.arange(pos, pos + n))
            pos += n
        for k, v in self._recent_blocks():
            n = k.shape[1]
            yield KVBlock(k, v, np.arange(pos, pos + n))
            pos += n

    def fetch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All held keys and values (S, Hkv, D) float and their positions (S,)."""
        blocks = list(self.blocks())
        if not blocks:
            empty = np.zeros((0, self.n_kv_heads, self.head_dim), np.float32)
            return empty, empty, np.zeros(0, np.int64)
        k = np.concatenate([b.keys for b in blocks], axis=1).transpose(1, 0, 2)
        v = np.concatenate([b.values for b in blocks], axis=1).transpose(1, 0, 2)
        return k, v, np.concatenate([b.positions for b in blocks])

    def update_and_fetch(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """update(k, v), then every held key and value (S, Hkv, D)."""
        self.update(k, v)
        keys, values, _ = self.fetch()
        return keys, values

    def attend(self, q: np.ndarray, q_pos: np.ndarray, scale: float, window: int | None,
               backend) -> np.ndarray:
        """Attention of q (T, H, D) at positions q_pos over the held keys; (T, H * D) float32.
        The default reads the cache block by block (online softmax)."""
        from ..kernels.ops import blockwise_attention

        return blockwise_attention(q, self.blocks(), q_pos, scale, window)

    def trim(self, n: int) -> int:
        """Forget the last n positions; returns how many were dropped. A bounded cache that has
        already dropped positions it would now need forgets everything (offset 0)."""
        n = max(0, min(self.offset, n))
        recent = self.offset - self.start
        need = self.window - 1 if (self.exact and self.window) else 0
        evicted = self.start > len(self._sink_k)
        if evicted and n > recent - need:
            dropped = self.offset
            self.reset()
            return dropped
        if n <= recent:
            self._drop_back(n)
        else:  # nothing evicted yet: cut into the sinks too
            self._drop_back(recent)
            keep = self.offset - n
            self._sink_k, self._sink_v = self._sink_k[:keep], self._sink_v[:keep]
            self.start = keep
        self.offset -= n
        return n

    def reset(self) -> None:
        self._clear()
        self.offset = self.start = 0
        self._sink_k, self._sink_v = self._sink_k[:0], self._sink_v[:0]

    @property
    def state(self) -> dict[str, np.ndarray]:
        """Everything needed to restore this cache exactly (see cache/persist.py)."""
        return {"offset": np.array(self.offset), "start": np.array(self.start),
                "sink_k": self._sink_k, "sink_v": self._sink_v, **self._storage_state()}

    @state.setter
    def state(self, state: dict[str, np.ndarray]) -> None:
        self.reset()
        self.offset, self.start = int(state["offset"]), int(state["start"])
        self._sink_k = np.asarray(state["sink_k"], np.float32)
        self._sink_v = np.asarray(state["sink_v"], np.float32)
        self._load_storage_state(state)

    def bytes_at(self, n_positions: int, chunk: int = 256) -> int:
        """Bytes this cache holds after n_positions tokens (sinks included) fed in chunks of
        at most `chunk`, for budgets: a bounded cache levels off at its window."""
        sinks = min(self.sinks, n_positions)
        recent = n_positions - sinks
        if self.window is not None:
            recent = levelled(recent, self._keep(), chunk)
        return self.bytes_for(recent) + 2 * sinks * self.n_kv_heads * self.head_dim * 4


class StandardKVCache(KVCache):
    """Keys and values kept whole, in float16 (kv_cache="f16") or float32."""

    STEP = 256

    def __init__(self, n_kv_heads: int, head_dim: int, dtype=np.float16, **bounds):
        super().__init__(n_kv_heads, head_dim, **bounds)
        self.dtype = np.dtype(dtype)
        # (capacity, Hkv, D): position-major, so the held rows are one contiguous block that
        # the ORT decode kernel reads without a copy. With sinks, rows [0, sinks) hold the
        # shown (re-rotated) sink keys, rewritten when the shift changes.
        self.keys: np.ndarray | None = None
        self.values: np.ndarray | None = None

    def _rows(self) -> int:
        return len(self._sink_k) + self.offset - self.start

    def _grow(self, needed: int) -> None:
        capacity = 0 if self.keys is None else self.keys.shape[0]
        if needed <= capacity:
            return
        new_cap = ((needed + self.STEP - 1) // self.STEP) * self.STEP
        shape = (new_cap, self.n_kv_heads, self.head_dim)
        keys, values = np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)
        if self.keys is not None:
            rows = self._rows()
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
        rows = self._rows()
        t = k.shape[0]
        self._grow(rows + t)
        self.keys[rows : rows + t] = k
        self.values[rows : rows + t] = v

    def _drop_front(self, n):
        s, rows = len(self._sink_k), self._rows()
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
        s, rows = len(self._sink_k), self._rows()
        if rows > s:
            yield (self.keys[s:rows].transpose(1, 0, 2),  # (S, Hkv, D) -> (Hkv, S, D)
                   self.values[s:rows].transpose(1, 0, 2))

    def fetch(self):
        if self.keys is None or not self._rows():
            return super().fetch()
        rows = self._rows()
        if len(self._sink_k) and self._shown_shift != self.start - len(self._sink_k):
            self._write_sinks()
        return (self.keys[:rows], self.values[:rows],
                np.arange(self.first_position, self.offset))

    def attend(self, q, q_pos, scale, window, backend):
        # The store is one contiguous (S, Hkv, D) block: the backend's kernel reads it directly
        # (ORT's decode graph casts float16 vectorized; numpy would go element by element).
        # A chunk of queries: converted a block at a time, BLAS on one thread
        # (kernels/prefill_attention says why).
        keys, values, k_pos = self.fetch()
        if window is not None and len(k_pos) and q_pos[0] - k_pos[0] >= window:
            first = int(q_pos[0] - window + 1 - k_pos[0])  # older than every query's window
            keys, values, k_pos = keys[first:], values[first:], k_pos[first:]
        if len(q_pos) > 1:
            # a few queries (a chat turn): the backend's one-call kernel if it has one
            out = backend.few_query_attention(q, keys, values, q_pos, k_pos, scale, window)
            if out is not None:
                return out
            from ..kernels.prefill_attention import float_blocks, prefill_attention

            blocks = float_blocks(keys, values, int(k_pos[0]))
            return prefill_attention(q, q_pos, blocks, scale, window)
        return backend.attention(q, keys, values, q_pos, k_pos, scale, window)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def bytes_for(self, n):
        rows = -(-(n + len(self._sink_k)) // self.STEP) * self.STEP if n else 0
        return 2 * rows * self.n_kv_heads * self.head_dim * self.dtype.itemsize

    def _storage_state(self):
        if self.keys is None:
            empty = np.zeros((0, self.n_kv_heads, self.head_dim), self.dtype)
            return {"keys": empty, "values": empty}
        rows = self._rows()
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
        from .quantized import QuantizedKVCache

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
