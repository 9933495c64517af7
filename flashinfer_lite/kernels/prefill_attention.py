"""Causal attention of a chunk of queries (a prompt chunk, a chat turn's new tokens) over a KV
cache: the store converted to float32 a block at a time by numba kernels, multiplied by BLAS on
one thread, with an online softmax across blocks (kernels/ops.blockwise_attention).

Why this shape (measured, SmolLM2, 14 new tokens over 2,000 cached ones, 2 cores):
- OpenBLAS's own threads fought ONNX Runtime's spinning thread pool for the same 2 cores: one
  layer's attention took 20-160 ms for ~1 ms of arithmetic. One BLAS thread here: 1.1 ms.
- numpy converts float16 one element at a time (~2.5 ns each) and dequantizing q8/q4 in numpy
  makes several full-size temporaries; the numba kernels below do one pass, through a lookup
  table for float16 (numba has no float16 on CPU).
- A pure numba attention loop (no BLAS) reached ~10 GFLOP/s, single-threaded BLAS ~60.
"""

from __future__ import annotations

import numba
import numpy as np

BLOCK = 1024  # positions converted at a time (a multiple of every q8/q4 key group)

_STATE: dict = {}


def half_table() -> np.ndarray:
    """float32 value of every float16 bit pattern (65536 entries, 256 KiB)."""
    if "table" not in _STATE:
        _STATE["table"] = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(
            np.float16).astype(np.float32)
    return _STATE["table"]


def one_blas_thread():
    """A context in which numpy's BLAS runs on the calling thread only (threadpoolctl)."""
    if "blas" not in _STATE:
        from threadpoolctl import ThreadpoolController

        _STATE["blas"] = ThreadpoolController()
    return _STATE["blas"].limit(limits=1, user_api="blas")


@numba.njit(cache=True)
def halves_to_heads(x, table, out):
    """x (S, Hkv, D) float16 bits (uint16) -> out (Hkv, S, D) float32."""
    n, hkv, d = x.shape
    for p in range(n):
        for h in range(hkv):
            for i in range(d):
                out[h, p, i] = table[x[p, h, i]]


@numba.njit(cache=True, inline="always")
def unpack_position(kq, vq, p, h, bits, d, ksr, kmr, kout, j, k, row):
    """Position p, KV head h of a q8/q4 store: the key dequantized into kout[j, k] (ksr, kmr
    (Hkv, D): its key group's scales and minimums as float32), the value's codes as float32
    into row (D,). q4: channel i in the low nibble of byte i, channel i + D/2 in the high one.
    The caller scales row per value group: doing that here too left numba's reference counts
    of this function's arrays inside the callers' loops (1.6-1.8x slower at D = 64)."""
    if bits == 8:
        for i in range(d):
            kout[j, k, i] = np.float32(kq[p, h, i]) * ksr[h, i] + kmr[h, i]
            row[i] = np.float32(vq[p, h, i])
    else:
        half = d // 2
        for i in range(half):
            kout[j, k, i] = np.float32(kq[p, h, i] & 15) * ksr[h, i] + kmr[h, i]
            kout[j, k, i + half] = (np.float32(kq[p, h, i] >> 4) * ksr[h, i + half]
                                    + kmr[h, i + half])
            row[i] = np.float32(vq[p, h, i] & 15)
            row[i + half] = np.float32(vq[p, h, i] >> 4)


@numba.njit(cache=True)
def codes_to_heads(kq, ks, km, vq, vs, vm, a, b, group, vgroup, bits, table, kout, vout):
    """Positions [a, b) of a q8/q4 store (a a multiple of `group`; scales and minimums as
    float16 bits) -> kout, vout (Hkv, b - a, D) float32 (q4 packed as unpack_position
    says)."""
    hkv, d = kout.shape[0], kout.shape[2]
    ksr = np.empty((hkv, d), np.float32)
    kmr = np.empty((hkv, d), np.float32)
    row = np.empty(d, np.float32)
    for h in range(hkv):
        for p in range(a, b):
            if (p - a) % group == 0 or p == a:  # a new key group: its scales as float32
                grp = p // group
                for i in range(d):
                    ksr[h, i] = table[ks[grp, h, i]]
                    kmr[h, i] = table[km[grp, h, i]]
            unpack_position(kq, vq, p, h, bits, d, ksr, kmr, kout, h, p - a, row)
            for c in range(d // vgroup):
                sc, mn = table[vs[p, h, c]], table[vm[p, h, c]]
                for i in range(c * vgroup, (c + 1) * vgroup):
                    vout[h, p - a, i] = row[i] * sc + mn


def float_blocks(k: np.ndarray, v: np.ndarray, pos0: int):
    """k, v (S, Hkv, D) float16 or float32 at positions pos0 ... -> KVBlocks (Hkv, n, D)."""
    from ..cache.kv import KVBlock

    for a in range(0, len(k), BLOCK):
        b = min(a + BLOCK, len(k))
        if k.dtype == np.float16:
            shape = (k.shape[1], b - a, k.shape[2])
            kf, vf = np.empty(shape, np.float32), np.empty(shape, np.float32)
            halves_to_heads(np.ascontiguousarray(k[a:b]).view(np.uint16), half_table(), kf)
            halves_to_heads(np.ascontiguousarray(v[a:b]).view(np.uint16), half_table(), vf)
        else:
            kf, vf = k[a:b].transpose(1, 0, 2), v[a:b].transpose(1, 0, 2)  # (Hkv, n, D)
        yield KVBlock(kf, vf, np.arange(pos0 + a, pos0 + b))


def _kernel_arrays(view):
    """A QuantizedView's arrays as the kernels take them, contiguous: (kq, ks, km, vq, vs, vm),
    scales and minimums as float16 bits (uint16)."""
    ks, km, vs, vm = (np.ascontiguousarray(x, np.float16).view(np.uint16)
                      for x in (view.ks, view.km, view.vs, view.vm))
    return np.ascontiguousarray(view.kq), ks, km, np.ascontiguousarray(view.vq), vs, vm


def code_blocks(view, pos0: int):
    """The quantized part of a QuantizedView (cache/quantized.py) at positions pos0 ... ->
    KVBlocks (Hkv, n, D) float32."""
    from ..cache.kv import KVBlock

    n = len(view.kq)
    if not n:
        return
    hkv, d = view.ks.shape[1], view.ks.shape[2]
    arrays = _kernel_arrays(view)
    for a in range(0, n, BLOCK):
        b = min(a + BLOCK, n)
        kf = np.empty((hkv, b - a, d), np.float32)
        vf = np.empty((hkv, b - a, d), np.float32)
        codes_to_heads(*arrays, a, b, view.group, view.vgroup, view.bits, half_table(), kf, vf)
        yield KVBlock(kf, vf, np.arange(pos0 + a, pos0 + b))


@numba.njit(cache=True)
def codes_to_rows(kq, ks, km, vq, vs, vm, group, vgroup, bits, table, kout, vout):
    """Every position of a q8/q4 store -> kout, vout (N, Hkv, D) float32, position-major
    like the store (scales and minimums as float16 bits; q4 packed as in codes_to_heads)."""
    n, hkv = kq.shape[0], kq.shape[1]
    d = kout.shape[2]
    ksr = np.empty((hkv, d), np.float32)
    kmr = np.empty((hkv, d), np.float32)
    row = np.empty(d, np.float32)
    for p in range(n):
        if p % group == 0:  # a new key group: its scales as float32
            grp = p // group
            for h in range(hkv):
                for i in range(d):
                    ksr[h, i] = table[ks[grp, h, i]]
                    kmr[h, i] = table[km[grp, h, i]]
        for h in range(hkv):
            unpack_position(kq, vq, p, h, bits, d, ksr, kmr, kout, p, h, row)
            for c in range(d // vgroup):
                sc, mn = table[vs[p, h, c]], table[vm[p, h, c]]
                for i in range(c * vgroup, (c + 1) * vgroup):
                    vout[p, h, i] = row[i] * sc + mn


def codes_into(view, keys: np.ndarray, values: np.ndarray) -> None:
    """The quantized part of a QuantizedView -> keys, values (N, Hkv, D) float32 (contiguous),
    written in place."""
    codes_to_rows(*_kernel_arrays(view), view.group, view.vgroup, view.bits, half_table(),
                  keys, values)


def prefill_attention(q: np.ndarray, q_pos: np.ndarray, blocks, scale: float,
                      window: int | None) -> np.ndarray:
    """q (T, H, D) at positions q_pos over KVBlocks in position order -> (T, H * D)."""
    from .ops import blockwise_attention

    with one_blas_thread():
        return blockwise_attention(q, blocks, q_pos, scale, window)
