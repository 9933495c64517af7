"""KIVI-style quantized KV caches (kv_cache="q8" / "q4").

Keys are quantized per channel over groups of GROUP tokens (keys have outlier channels, so a
channel's range is what varies), values per token over groups of VALUE_GROUP channels; each keeps
an asymmetric float16 scale and minimum. The most recent `residual` positions stay in float16 and
are flushed into the quantized store a whole group at a time. q4 packs two channels per byte:
channel i in the low nibble, channel i + D/2 in the high one, so unpacking is a concatenation.

Bytes per element, keys / values: q8 1 + 4/128 / 1 + 4/64, q4 0.5 + 4/128 / 0.5 + 4/64, vs 2
for float16.

quantize / dequantize / pack4 / unpack4 are the format in numpy: the cache's own rare reads
(a trim that cuts a group, fetch) use them, and the tests check the attention kernels' one
numba pass over the codes (kernels/kv_codes.py) against them bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import EVICT_STEP, KVCache, grown

GROUP = EVICT_STEP  # tokens per key group (the default; a cache may use any divisor of STEP)
VALUE_GROUP = 64  # channels per value group (capped at head_dim)
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


@dataclass
class QuantizedView:
    """What the attention kernels read from a quantized cache, position-major: the held
    positions in order are the sinks, the quantized store, the residual.

    kq, vq (N, Hkv, W) uint8 codes (W = D, or D/2 packed for q4); ks, km (N/group, Hkv, D) and
    vs, vm (N, Hkv, D/vgroup) float16; sink_k, sink_v (S, Hkv, D) float32, the sinks as shown
    (re-rotated); res_k, res_v (R, Hkv, D) float16, the residual."""

    bits: int
    group: int
    vgroup: int
    kq: np.ndarray
    ks: np.ndarray
    km: np.ndarray
    vq: np.ndarray
    vs: np.ndarray
    vm: np.ndarray
    sink_k: np.ndarray
    sink_v: np.ndarray
    res_k: np.ndarray
    res_v: np.ndarray

    @property
    def full_k(self) -> np.ndarray:
        """(S + R, Hkv, D) float16: the positions kept whole, sinks then residual (for a
        single unmasked query, to which their order does not matter)."""
        return np.concatenate([self.sink_k.astype(np.float16), self.res_k])

    @property
    def full_v(self) -> np.ndarray:
        return np.concatenate([self.sink_v.astype(np.float16), self.res_v])


class QuantizedKVCache(KVCache):
    """q8 / q4 keys and values, the newest `residual` positions in float16. Storage is
    position-major (N, Hkv, ...) so the used part of every array is one contiguous block."""

    def __init__(self, n_kv_heads: int, head_dim: int, bits: int = 8, residual: int = 128,
                 group: int | None = None, **bounds):
        super().__init__(n_kv_heads, head_dim, **bounds)
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8; got {bits!r}")
        self.group = group or GROUP
        if STEP % self.group or EVICT_STEP % self.group:
            raise ValueError(f"group must divide {STEP} and {EVICT_STEP}; got {self.group!r}")
        if residual < self.group:
            raise ValueError(f"residual must be >= {self.group}; got {residual!r}")
        self.bits, self.residual = bits, residual
        self.vgroup = min(VALUE_GROUP, head_dim)
        self.width = head_dim if bits == 8 else head_dim // 2  # bytes per position per head
        self.n_q = 0  # positions in the quantized store
        self.n_r = 0  # positions in the residual
        self._kq = self._ks = self._km = self._vq = self._vs = self._vm = None
        self._rk = self._rv = None  # (residual, Hkv, D) float16

    # ---- storage -----------------------------------------------------------------------------
    def _alloc(self, cap: int) -> None:
        """Grow the quantized store to hold cap positions."""
        old = 0 if self._kq is None else self._kq.shape[0]
        if cap <= old:
            return
        cap = grown(cap, STEP)
        h, d = self.n_kv_heads, self.head_dim
        shapes = {"_kq": ((cap, h, self.width), np.uint8),
                  "_ks": ((cap // self.group, h, d), np.float16),
                  "_km": ((cap // self.group, h, d), np.float16),
                  "_vq": ((cap, h, self.width), np.uint8),
                  "_vs": ((cap, h, d // self.vgroup), np.float16),
                  "_vm": ((cap, h, d // self.vgroup), np.float16)}
        for name, (shape, dtype) in shapes.items():
            new = np.zeros(shape, dtype)
            cur = getattr(self, name)
            if cur is not None:
                n = self.n_q // self.group if name in ("_ks", "_km") else self.n_q
                new[:n] = cur[:n]
            setattr(self, name, new)

    def _alloc_residual(self) -> None:
        shape = (self.residual, self.n_kv_heads, self.head_dim)  # (residual, Hkv, D)
        self._rk, self._rv = np.zeros(shape, np.float16), np.zeros(shape, np.float16)

    def _quantize_into(self, k: np.ndarray, v: np.ndarray) -> None:
        """Append k, v (n, Hkv, D) float32, n a multiple of self.group, to the quantized store."""
        n, h, d = k.shape
        a = self.n_q
        self._alloc(a + n)
        kq, ks, km = quantize(k.reshape(n // self.group, self.group, h, d), self.bits, axis=1)
        vq, vs, vm = quantize(v.reshape(n, h, d // self.vgroup, self.vgroup), self.bits, axis=3)
        kq, vq = kq.reshape(n, h, d), vq.reshape(n, h, d)  # (n, Hkv, D)
        if self.bits == 4:
            kq, vq = pack4(kq), pack4(vq)
        self._kq[a : a + n], self._vq[a : a + n] = kq, vq
        self._ks[a // self.group : (a + n) // self.group] = ks
        self._km[a // self.group : (a + n) // self.group] = km
        self._vs[a : a + n], self._vm[a : a + n] = vs, vm
        self.n_q += n

    def _dequantize(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Quantized positions [a, b) (a a multiple of self.group) -> (b-a, Hkv, D) float32."""
        h, d, n = self.n_kv_heads, self.head_dim, b - a
        kq, vq = self._kq[a:b], self._vq[a:b]
        if self.bits == 4:
            kq, vq = unpack4(kq), unpack4(vq)
        g = self.group
        ks, km = self._ks[a // g : -(-b // g)], self._km[a // g : -(-b // g)]
        full = (n // g) * g
        k = np.empty((n, h, d), np.float32)
        k[:full] = dequantize(kq[:full].reshape(full // g, g, h, d),
                              ks[: full // g], km[: full // g], axis=1).reshape(full, h, d)
        if full < n:  # a partial last group (only after a trim hands it back)
            k[full:] = dequantize(kq[full:], ks[-1], km[-1], axis=0)
        v = dequantize(vq.reshape(n, h, d // self.vgroup, self.vgroup), self._vs[a:b],
                       self._vm[a:b], axis=3).reshape(n, h, d)
        return k, v

    def _append(self, k, v):
        if self._rk is None:
            self._alloc_residual()
        total = self.n_r + len(k)
        if total <= self.residual:
            self._rk[self.n_r : total], self._rv[self.n_r : total] = k, v
            self.n_r = total
            return
        # flush whole groups, oldest first, until at most `residual` positions remain. New
        # positions are rounded to float16 as if they had passed through the residual, so the
        # store does not depend on how tokens were chunked (prefill vs one at a time).
        allk = np.concatenate([self._rk[: self.n_r], k.astype(np.float16)]).astype(np.float32)
        allv = np.concatenate([self._rv[: self.n_r], v.astype(np.float16)]).astype(np.float32)
        flush = -(-(total - self.residual) // self.group) * self.group
        self._quantize_into(allk[:flush], allv[:flush])
        self.n_r = total - flush
        self._rk[: self.n_r], self._rv[: self.n_r] = allk[flush:], allv[flush:]

    def _drop_front(self, n):
        # bounded caches require window >= residual, so evicted positions are all quantized
        assert n % self.group == 0 and n <= self.n_q, (n, self.n_q)
        m = self.n_q - n
        for name in ("_kq", "_vq", "_vs", "_vm"):
            arr = getattr(self, name)
            arr[:m] = arr[n : self.n_q]
        for name in ("_ks", "_km"):
            arr = getattr(self, name)
            arr[: m // self.group] = arr[n // self.group : self.n_q // self.group]
        self.n_q = m

    def _drop_back(self, n):
        if n <= self.n_r:
            self.n_r -= n
            return
        keep = self.n_q - (n - self.n_r)
        full = (keep // self.group) * self.group
        # the cut group's surviving positions go back to the residual, dequantized
        k, v = self._dequantize(full, keep) if keep > full else (None, None)
        self.n_q, self.n_r = full, 0
        if k is not None:
            self._rk[: keep - full], self._rv[: keep - full] = k, v
            self.n_r = keep - full

    def _clear(self):
        self._kq = self._ks = self._km = self._vq = self._vs = self._vm = None
        self._rk = self._rv = None
        self.n_q = self.n_r = 0

    def _recent_blocks(self):
        for a in range(0, self.n_q, BLOCK):
            k, v = self._dequantize(a, min(a + BLOCK, self.n_q))
            yield k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # (S, Hkv, D) -> (Hkv, S, D)
        if self.n_r:
            yield self._rk[: self.n_r].transpose(1, 0, 2), self._rv[: self.n_r].transpose(1, 0, 2)

    def view(self) -> QuantizedView:
        n, g, h, d = self.n_q, self.group, self.n_kv_heads, self.head_dim
        if self._kq is None:  # nothing quantized yet: empty arrays of the store's shapes
            codes, scales = np.zeros((0, h, self.width), np.uint8), np.zeros((0, h, d), np.float16)
            vscales = np.zeros((0, h, d // self.vgroup), np.float16)
            stores = (codes, scales, scales, codes, vscales, vscales)
        else:
            stores = (self._kq[:n], self._ks[: n // g], self._km[: n // g], self._vq[:n],
                      self._vs[:n], self._vm[:n])
        if self._rk is None:
            residual = (np.zeros((0, h, d), np.float16),) * 2
        else:
            residual = (self._rk[: self.n_r], self._rv[: self.n_r])
        return QuantizedView(self.bits, g, self.vgroup, *stores, *self._shown_sinks(), *residual)

    @property
    def nbytes(self) -> int:
        arrays = (self._kq, self._ks, self._km, self._vq, self._vs, self._vm, self._rk, self._rv)
        return sum(a.nbytes for a in arrays if a is not None) + self._sink_k.nbytes * 2

    def bytes_for(self, n):
        if n == 0:
            return 0
        h, d = self.n_kv_heads, self.head_dim
        n_r = n if n <= self.residual else self.residual - (-(n - self.residual) % self.group)
        cap = grown(n - n_r, STEP)
        per_pos = 2 * h * self.width + 2 * 2 * h * (d // self.vgroup)  # k, v codes; v scales
        return cap * per_pos + 2 * 2 * h * (cap // self.group) * d + 2 * 2 * h * self.residual * d

    def _storage_state(self):
        state = {"n_q": np.array(self.n_q), "n_r": np.array(self.n_r)}
        if self._rk is not None:
            state.update(rk=self._rk[: self.n_r], rv=self._rv[: self.n_r])
        if self._kq is not None:
            n, g = self.n_q, self.n_q // self.group
            state.update(kq=self._kq[:n], vq=self._vq[:n], vs=self._vs[:n], vm=self._vm[:n],
                         ks=self._ks[:g], km=self._km[:g])
        return state

    def _load_storage_state(self, state):
        self._clear()
        n_q, n_r = int(state["n_q"]), int(state["n_r"])
        if n_q:
            self._alloc(n_q)
            self._kq[:n_q], self._vq[:n_q] = state["kq"], state["vq"]
            self._vs[:n_q], self._vm[:n_q] = state["vs"], state["vm"]
            g = n_q // self.group
            self._ks[:g], self._km[:g] = state["ks"], state["km"]
        if "rk" in state:
            self._alloc_residual()
            self._rk[:n_r], self._rv[:n_r] = state["rk"], state["rv"]
        self.n_q, self.n_r = n_q, n_r

