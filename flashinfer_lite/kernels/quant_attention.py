"""Decode attention computed on q8/q4 codes, as a numba kernel (compiled on first use).

One query against a quantized KV cache (a cache/quantized.QuantizedView): the key scales are
folded into the query once per group and the value scales into the probabilities, so the
cache is read once, byte by byte, and never expanded to float:

    score[n] = sum_d (q[d] * ks[b, d]) * kq[n, d] + sum_d q[d] * km[b, d]     (b: n's key group)
    out[d]   = sum_n (p[n] * vs[n, c]) * vq[n, d] + sum_n p[n] * vm[n, c]    (c: d's value group)

numba has no float16 on CPU, so scales and the float16 positions are read as uint16 bits and
converted with integer ops (numpy's float16 conversion is ~2.5 ns per element here).
Measured against the ORT float16 kernel at 4096 positions: see benchmarks/bench_kv.py speed.
"""

from __future__ import annotations

import numba
import numpy as np

# Module-level kernels so numba's on-disk cache works (closures are recompiled per process);
# this module is imported only when a quantized cache first decodes (kernels/base.py).


@numba.njit(cache=True, fastmath=True)
def h2f(h):
    """uint16 float16 bits (contiguous) -> float32 (subnormals flushed to zero)."""
    flat = h.ravel()
    out = np.empty(flat.size, np.uint32)
    for i in range(flat.size):
        x = np.uint32(flat[i])
        em = x & np.uint32(0x7FFF)
        bits = ((x & np.uint32(0x8000)) << np.uint32(16)) | (
            ((em + np.uint32(0x1C000)) << np.uint32(13)) if em >= 0x400 else np.uint32(0))
        out[i] = bits
    return out.view(np.float32).reshape(h.shape)


@numba.njit(cache=True, fastmath=True, inline="always")
def unpack_codes(codes, n, h, bits, d, row):
    """row (D,) = position n, KV head h of codes (N, Hkv, W) as float32: q8 one byte per
    channel, q4 channel i in the low nibble of byte i and channel i + D/2 in the high one."""
    if bits == 8:
        for i in range(d):
            row[i] = np.float32(codes[n, h, i])
    else:
        half = d // 2
        for i in range(half):
            row[i] = np.float32(codes[n, h, i] & 15)
            row[i + half] = np.float32(codes[n, h, i] >> 4)


@numba.njit(cache=True, fastmath=True)
def decode(q, kq, ks, km, vq, vs, vm, fk, fv, group, vgroup, bits):
    """q (Hkv, G, D) float32, already times the softmax scale; kq, vq (N, Hkv, W) uint8;
    ks, km (N/group, Hkv, D), vs, vm (N, Hkv, D/vgroup), fk, fv (R, Hkv, D) as uint16
    float16 bits. Returns (Hkv, G, D) float32."""
    n_q, hkv, _ = kq.shape
    g, d = q.shape[1], q.shape[2]
    r = fk.shape[0]
    n_groups = n_q // group
    ksf, kmf, vsf, vmf = h2f(ks), h2f(km), h2f(vs), h2f(vm)
    fkf, fvf = h2f(fk), h2f(fv)
    cn = d // vgroup
    p = np.empty((hkv, g, n_q + r), np.float32)
    # scores, key group by key group
    for b in range(n_groups):
        qs = np.empty((g, d), np.float32)
        row = np.empty(d, np.float32)
        for h in range(hkv):
            for j in range(g):
                acc = np.float32(0)
                for i in range(d):
                    qs[j, i] = q[h, j, i] * ksf[b, h, i]
                    acc += q[h, j, i] * kmf[b, h, i]
                for n in range(b * group, (b + 1) * group):
                    p[h, j, n] = acc
            for n in range(b * group, (b + 1) * group):
                unpack_codes(kq, n, h, bits, d, row)
                for j in range(g):
                    acc = np.float32(0)
                    for i in range(d):
                        acc += qs[j, i] * row[i]
                    p[h, j, n] += acc
    for h in range(hkv):
        for n in range(r):
            for j in range(g):
                acc = np.float32(0)
                for i in range(d):
                    acc += q[h, j, i] * fkf[n, h, i]
                p[h, j, n_q + n] = acc
        for j in range(g):
            m = p[h, j].max()
            total = np.float32(0)
            for n in range(n_q + r):
                e = np.exp(p[h, j, n] - m)
                p[h, j, n] = e
                total += e
            inv = np.float32(1) / total
            for n in range(n_q + r):
                p[h, j, n] *= inv
    # values (in two partial sums: room for two threads later)
    n_parts = 2
    parts = np.zeros((n_parts, hkv, g, d), np.float32)
    for part in range(n_parts):
        lo_n = n_q * part // n_parts
        hi_n = n_q * (part + 1) // n_parts
        row = np.empty(d, np.float32)
        for n in range(lo_n, hi_n):
            for h in range(hkv):
                unpack_codes(vq, n, h, bits, d, row)
                for c in range(cn):
                    sc, mn = vsf[n, h, c], vmf[n, h, c]
                    for i in range(c * vgroup, (c + 1) * vgroup):
                        row[i] = row[i] * sc + mn
                for j in range(g):
                    pj = p[h, j, n]
                    for i in range(d):
                        parts[part, h, j, i] += pj * row[i]
    out = parts.sum(axis=0)
    for h in range(hkv):
        for j in range(g):
            for n in range(r):
                pj = p[h, j, n_q + n]
                for i in range(d):
                    out[h, j, i] += pj * fvf[n, h, i]
    return out



def quantized_decode(q: np.ndarray, view, scale: float) -> np.ndarray:
    """q (1, H, D) over a QuantizedView -> (1, H * D) float32."""
    _, h, d = q.shape
    hkv = view.kq.shape[1]
    qg = q.reshape(hkv, h // hkv, d) * np.float32(scale)  # (1, H, D) -> (Hkv, G, D)
    bits16 = [np.ascontiguousarray(a, np.float16).view(np.uint16)
              for a in (view.ks, view.km, view.vs, view.vm, view.full_k, view.full_v)]
    out = decode(np.ascontiguousarray(qg, np.float32), np.ascontiguousarray(view.kq),
                     bits16[0], bits16[1], np.ascontiguousarray(view.vq), *bits16[2:],
                     view.group, view.vgroup, view.bits)
    return out.reshape(1, h * d)
