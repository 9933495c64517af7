"""KIVI-style quantized KV caches (kv_cache="q8" / "q4").

Keys are quantized per channel over groups of GROUP tokens (keys have outlier channels, so a
channel's range is what varies), values per token over groups of GROUP channels; each group keeps
an asymmetric float16 scale and minimum. The most recent `residual` positions stay in float16 and
are flushed into the quantized store a whole group at a time. q4 packs two channels per byte:
channel i in the low nibble, channel i + D/2 in the high one, so unpacking is a concatenation.

Bytes per element, keys / values: q8 1 + 4/64 each, q4 0.5 + 4/64 each, vs 2 for float16.
"""

from __future__ import annotations

import numpy as np

from .kv import EVICT_STEP, KVCache

GROUP = EVICT_STEP  # tokens per key group; channels per value group (capped at head_dim)
BLOCK = 1024  # positions dequantized at a time by attention (a multiple of GROUP)
STEP = 128  # the quantized store grows by this many positions (a multiple of GROUP)


def _f16_down(x: np.ndarray) -> np.ndarray:
    """x rounded to float16, never above x (a minimum stays below every value)."""
    h = x.astype(np.float16)
    return np.where(h.astype(np.float32) > x, np.nextafter(h, np.float16(-np.inf)), h)


def _f16_up(x: np.ndarray) -> np.ndarray:
    h = x.astype(np.float16)
    return np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h)


def quantize(x: np.ndarray, bits: int, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric quantization of x over `axis` (the group axis, reduced).

    Returns q (x's shape, uint8 in [0, 2**bits - 1]), scale and minimum (x's shape without
    `axis`, float16) with x ~= q * scale + minimum and |error| <= scale / 2.
    """
    levels = (1 << bits) - 1
    lo = _f16_down(x.min(axis=axis))
    hi = x.max(axis=axis)
    scale = _f16_up((hi - lo.astype(np.float32)) / levels)
    s = scale.astype(np.float32)
    s = np.where(s > 0, s, np.float32(1.0))  # a constant group: q = 0, exact
    q = np.rint((x - np.expand_dims(lo.astype(np.float32), axis)) / np.expand_dims(s, axis))
    return np.clip(q, 0, levels).astype(np.uint8), scale, lo


def dequantize(q: np.ndarray, scale: np.ndarray, minimum: np.ndarray, axis: int) -> np.ndarray:
    out = q.astype(np.float32)
    out *= np.expand_dims(scale.astype(np.float32), axis)
    out += np.expand_dims(minimum.astype(np.float32), axis)
    return out


def pack4(q: np.ndarray) -> np.ndarray:
    """(..., D) values in [0, 15] -> (..., D/2) bytes: channel i low nibble, i + D/2 high."""
    half = q.shape[-1] // 2
    return q[..., :half] | (q[..., half:] << 4)


def unpack4(p: np.ndarray) -> np.ndarray:
    return np.concatenate([p & 15, p >> 4], axis=-1)


class QuantizedKVCache(KVCache):
    """q8 / q4 keys and values, the newest `residual` positions in float16."""

    def __init__(self, n_kv_heads: int, head_dim: int, bits: int = 8, residual: int = 128,
                 **bounds):
        super().__init__(n_kv_heads, head_dim, **bounds)
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8; got {bits!r}")
        if residual < GROUP:
            raise ValueError(f"residual must be >= {GROUP}; got {residual!r}")
        self.bits, self.residual = bits, residual
        self.vgroup = min(GROUP, head_dim)
        self.width = head_dim if bits == 8 else head_dim // 2  # bytes per position per head
        self.n_q = 0  # positions in the quantized store
        self.n_r = 0  # positions in the residual
        self._kq = self._ks = self._km = self._vq = self._vs = self._vm = None
        self._rk = self._rv = None  # (Hkv, residual, D) float16

    # ---- storage -----------------------------------------------------------------------------
    def _alloc(self, cap: int) -> None:
        """Grow the quantized store to hold cap positions (a multiple of GROUP)."""
        old = 0 if self._kq is None else self._kq.shape[1]
        if cap <= old:
            return
        cap = -(-cap // STEP) * STEP
        h, d = self.n_kv_heads, self.head_dim
        shapes = {"_kq": ((h, cap, self.width), np.uint8),
                  "_ks": ((h, cap // GROUP, d), np.float16),
                  "_km": ((h, cap // GROUP, d), np.float16),
                  "_vq": ((h, cap, self.width), np.uint8),
                  "_vs": ((h, cap, d // self.vgroup), np.float16),
                  "_vm": ((h, cap, d // self.vgroup), np.float16)}
        for name, (shape, dtype) in shapes.items():
            new = np.zeros(shape, dtype)
            cur = getattr(self, name)
            if cur is not None:
                n = self.n_q if name in ("_kq", "_vq", "_vs", "_vm") else self.n_q // GROUP
                new[:, :n] = cur[:, :n]
            setattr(self, name, new)

    def _quantize_into(self, k: np.ndarray, v: np.ndarray) -> None:
        """Append k, v (Hkv, n, D) float32, n a multiple of GROUP, to the quantized store."""
        h, n, d = k.shape
        a = self.n_q
        self._alloc(a + n)
        kq, ks, km = quantize(k.reshape(h, n // GROUP, GROUP, d), self.bits, axis=2)
        vq, vs, vm = quantize(v.reshape(h, n, d // self.vgroup, self.vgroup), self.bits, axis=3)
        kq, vq = kq.reshape(h, n, d), vq.reshape(h, n, d)  # (Hkv, n, D)
        if self.bits == 4:
            kq, vq = pack4(kq), pack4(vq)
        self._kq[:, a : a + n], self._vq[:, a : a + n] = kq, vq
        self._ks[:, a // GROUP : (a + n) // GROUP] = ks
        self._km[:, a // GROUP : (a + n) // GROUP] = km
        self._vs[:, a : a + n], self._vm[:, a : a + n] = vs, vm
        self.n_q += n

    def _dequantize(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Quantized positions [a, b) (multiples of GROUP, or b = n_q) -> (Hkv, b-a, D) float32."""
        h, d, n = self.n_kv_heads, self.head_dim, b - a
        kq, vq = self._kq[:, a:b], self._vq[:, a:b]
        if self.bits == 4:
            kq, vq = unpack4(kq), unpack4(vq)
        gs = slice(a // GROUP, -(-b // GROUP))
        ks, km = self._ks[:, gs], self._km[:, gs]
        full = (n // GROUP) * GROUP
        k = np.empty((h, n, d), np.float32)
        k[:, :full] = dequantize(kq[:, :full].reshape(h, full // GROUP, GROUP, d),
                                 ks[:, : full // GROUP], km[:, : full // GROUP],
                                 axis=2).reshape(h, full, d)
        if full < n:  # a partial last group (only after a trim hands it back)
            k[:, full:] = dequantize(kq[:, full:], ks[:, -1], km[:, -1], axis=1)
        v = dequantize(vq.reshape(h, n, d // self.vgroup, self.vgroup), self._vs[:, a:b],
                       self._vm[:, a:b], axis=3).reshape(h, n, d)
        return k, v

    def _append(self, k, v):
        h, d = self.n_kv_heads, self.head_dim
        if self._rk is None:
            self._rk = np.zeros((h, self.residual, d), np.float16)
            self._rv = np.zeros((h, self.residual, d), np.float16)
        new_k = k.transpose(1, 0, 2)  # (T, Hkv, D) -> (Hkv, T, D)
        new_v = v.transpose(1, 0, 2)
        total = self.n_r + new_k.shape[1]
        if total <= self.residual:
            self._rk[:, self.n_r : total], self._rv[:, self.n_r : total] = new_k, new_v
            self.n_r = total
            return
        # flush whole groups, oldest first, until at most `residual` positions remain
        allk = np.concatenate([self._rk[:, : self.n_r].astype(np.float32), new_k], axis=1)
        allv = np.concatenate([self._rv[:, : self.n_r].astype(np.float32), new_v], axis=1)
        flush = -(-(total - self.residual) // GROUP) * GROUP
        self._quantize_into(allk[:, :flush], allv[:, :flush])
        self.n_r = total - flush
        self._rk[:, : self.n_r], self._rv[:, : self.n_r] = allk[:, flush:], allv[:, flush:]

    def _drop_front(self, n):
        # bounded caches require window >= residual, so evicted positions are all quantized
        assert n % GROUP == 0 and n <= self.n_q, (n, self.n_q)
        m = self.n_q - n
        for name in ("_kq", "_vq", "_vs", "_vm"):
            arr = getattr(self, name)
            arr[:, :m] = arr[:, n : self.n_q]
        for name in ("_ks", "_km"):
            arr = getattr(self, name)
            arr[:, : m // GROUP] = arr[:, n // GROUP : self.n_q // GROUP]
        self.n_q = m

    def _drop_back(self, n):
        if n <= self.n_r:
            self.n_r -= n
            return
        keep = self.n_q - (n - self.n_r)
        full = (keep // GROUP) * GROUP
        # the cut group's surviving positions go back to the residual, dequantized
        k, v = self._dequantize(full, keep) if keep > full else (None, None)
        self.n_q, self.n_r = full, 0
        if k is not None:
            self._rk[:, : keep - full], self._rv[:, : keep - full] = k, v
            self.n_r = keep - full

    def _clear(self):
        self._kq = self._ks = self._km = self._vq = self._vs = self._vm = None
        self._rk = self._rv = None
        self.n_q = self.n_r = 0

    def _recent_blocks(self):
        for a in range(0, self.n_q, BLOCK):
            yield self._dequantize(a, min(a + BLOCK, self.n_q))
        if self.n_r:
            yield self._rk[:, : self.n_r], self._rv[:, : self.n_r]

    @property
    def nbytes(self) -> int:
        arrays = (self._kq, self._ks, self._km, self._vq, self._vs, self._vm, self._rk, self._rv)
        return sum(a.nbytes for a in arrays if a is not None) + self._sink_k.nbytes * 2

    def bytes_for(self, n):
        if n == 0:
            return 0
        h, d = self.n_kv_heads, self.head_dim
        n_r = n if n <= self.residual else self.residual - (-(n - self.residual) % GROUP)
        cap = -(-(n - n_r) // STEP) * STEP
        per_pos = 2 * h * self.width + 2 * 2 * h * (d // self.vgroup)  # k, v codes; v scales
        return cap * per_pos + 2 * 2 * h * (cap // GROUP) * d + 2 * 2 * h * self.residual * d

    def _storage_state(self):
        if self._kq is None and self._rk is None:
            return {"n_q": np.array(0), "n_r": np.array(0)}
        state = {"n_q": np.array(self.n_q), "n_r": np.array(self.n_r),
                 "rk": self._rk[:, : self.n_r], "rv": self._rv[:, : self.n_r]}
        if self._kq is not None:
            g = -(-self.n_q // GROUP)
            state.update(kq=self._kq[:, : self.n_q], vq=self._vq[:, : self.n_q],
                         vs=self._vs[:, : self.n_q], vm=self._vm[:, : self.n_q],
                         ks=self._ks[:, :g], km=self._km[:, :g])
        return state

    def _load_storage_state(self, state):
        self._clear()
        n_q, n_r = int(state["n_q"]), int(state["n_r"])
        h, d = self.n_kv_heads, self.head_dim
        if n_q:
            self._alloc(-(-n_q // GROUP) * GROUP)
            self._kq[:, :n_q], self._vq[:, :n_q] = state["kq"], state["vq"]
            self._vs[:, :n_q], self._vm[:, :n_q] = state["vs"], state["vm"]
            g = len(state["ks"][0])
            self._ks[:, :g], self._km[:, :g] = state["ks"], state["km"]
        if n_q or n_r or "rk" in state:
            self._rk = np.zeros((h, self.residual, d), np.float16)
            self._rv = np.zeros((h, self.residual, d), np.float16)
            self._rk[:, :n_r], self._rv[:, :n_r] = state["rk"], state["rv"]
        self.n_q, self.n_r = n_q, n_r
