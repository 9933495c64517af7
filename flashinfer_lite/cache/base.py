"""The KV cache interface, and the rules of which positions a cache holds.

Every cache (float and quantized on the host, cache/kv.py and cache/quantized.py; float16 on
the MLX device, cache/mlx.py) is storage behind the one interface of `KVCache`:
`update(k, v)` appends the new tokens' keys (already rotated by RoPE) and values,
`fetch()` returns what is held, `update_and_fetch` is the two in one; `trim(n)`, `reset()`,
`state` (get and set), `nbytes`, `bytes_at(n)` for budgets, and `offset`, the position of the
next token: every position seen so far, including ones a bounded cache has dropped. Which
kernel attends over a cache is decided in kernels/attention.py, not here.

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

EVICT_STEP = 128  # a bounded cache drops positions in whole groups of this many (= key group)
WINDOW_SLACK = 128  # extra positions a sliding-window cache keeps, so small trims stay exact

# (k (n, Hkv, D) float32, delta) -> k rotated by delta more positions (RoPE composes additively)
RopeShift = Callable[[np.ndarray, int], np.ndarray]


def sliding_keep(window: int) -> int:
    """Recent positions a sliding-window layer keeps before appending: window - 1 for the next
    query, plus slack so a small trim stays exact."""
    return window - 1 + WINDOW_SLACK


def evictable(held: int, keep: int) -> int:
    """Oldest positions to drop from `held` recent ones: what exceeds `keep`, in whole
    EVICT_STEPs (so a quantized store drops whole key groups)."""
    return max(0, (held - keep) // EVICT_STEP * EVICT_STEP)


def levelled(n_positions: int, keep: int, chunk: int) -> int:
    """Recent positions a windowed cache may hold after n_positions fed in chunks of at most
    `chunk`: it levels off at keep + one eviction step + a chunk (for budgets)."""
    return min(n_positions, keep + EVICT_STEP - 1 + chunk)


def grown(needed: int, step: int) -> int:
    """Capacity for `needed` positions, in whole steps (storage grows a block at a time)."""
    return -(-needed // step) * step


@dataclass
class KVBlock:
    """A stretch of held positions, dequantized: keys/values (Hkv, S, D) float, positions (S,)."""

    keys: np.ndarray
    values: np.ndarray
    positions: np.ndarray


class KVCache(ABC):
    """The cache of one attention layer. This class decides what is held; subclasses store.

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

    # ---- what subclasses store ----------------------------------------------------------------
    @abstractmethod
    def _append(self, k, v) -> None:
        """Store k, v (T, Hkv, D) after the held recent positions."""

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

    # ---- the interface ---------------------------------------------------------------------------
    @property
    def held(self) -> int:
        """Positions held (sinks + recent)."""
        return len(self._sink_k) + self.offset - self.start

    @property
    def first_position(self) -> int:
        """Position (as attention sees it) of the first held key."""
        return self.offset - self.held

    @property
    def positions(self) -> np.ndarray:
        """(held,) positions of the held keys: always one contiguous range."""
        return np.arange(self.first_position, self.offset)

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
        self._append_recent(k, v, len(k))

    def _append_recent(self, k, v, t: int) -> None:
        """Evict what the window no longer needs, then store k, v (t new positions)."""
        if self.window is not None:
            self._evict()
        if t:
            self._append(k, v)
            self.offset += t

    def fetch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All held keys and values (S, Hkv, D) float and their positions (S,)."""
        blocks = list(self.blocks())
        if not blocks:
            empty = np.zeros((0, self.n_kv_heads, self.head_dim), np.float32)
            return empty, empty, np.zeros(0, np.int64)
        k = np.concatenate([b.keys for b in blocks], axis=1).transpose(1, 0, 2)
        v = np.concatenate([b.values for b in blocks], axis=1).transpose(1, 0, 2)
        return k, v, np.concatenate([b.positions for b in blocks])

    def update_and_fetch(self, k, v):
        """update(k, v), then every held key and value (fetch's layout, without positions)."""
        self.update(k, v)
        keys, values, _ = self.fetch()
        return keys, values

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
        """Everything needed to restore this cache exactly, as host arrays (cache/persist.py)."""
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

    # ---- which positions are held ----------------------------------------------------------------
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
