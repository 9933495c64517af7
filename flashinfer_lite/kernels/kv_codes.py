"""numba kernels over a KV cache's storage: float16 rows and q8/q4 codes to float32, and decode
attention computed on the codes themselves.

Every numba function that reads the cache's codes is in this file, with the one helper that
unpacks them (`unpack_codes`). numba caches compiled kernels on disk (cache=True), keyed on the
file that defines each kernel: a helper it inlines from another file is compiled into it, and an
edit to that file would leave the cached kernel stale. So inlined helpers live beside the kernels
that use them, and what kernels share across files is data passed as arguments (the float16
table of kernels/float16.py). Module-level functions only: numba's cache does not serve closures.

q8 codes are one byte per channel; q4 packs two: channel i in the low nibble of byte i, channel
i + D/2 in the high one (cache/quantized.py). Scales and minimums, float16, arrive as uint16 bits.

Decode attention (`decode`): the key scales are folded into the query once per group and the
value scales into the probabilities, so the cache is read once, byte by byte, never expanded:

    score[n] = sum_d (q[d] * ks[b, d]) * kq[n, d] + sum_d q[d] * km[b, d]     (b: n's key group)
    out[d]   = sum_n (p[n] * vs[n, c]) * vq[n, d] + sum_n p[n] * vm[n, c]    (c: d's value group)
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, inline="always")
def unpack_codes(codes, n, h, bits, d, row):
    """row (D,) = position n, KV head h of codes (N, Hkv, W) as float32. The callers scale row
    themselves: scaling here left numba's reference counts of this function's arrays inside
    the callers' loops (1.6-1.8x slower at D = 64)."""
    if bits == 8:
        for i in range(d):
            row[i] = np.float32(codes[n, h, i])
    else:
        half = d // 2
        for i in range(half):
            row[i] = np.float32(codes[n, h, i] & 15)
            row[i + half] = np.float32(codes[n, h, i] >> 4)


@numba.njit(cache=True, inline="always")
def halves(x, table):
    """float16 bits (any shape, contiguous) -> float32 of the same shape."""
    flat = x.ravel()
    out = np.empty(flat.size, np.float32)
    for i in range(flat.size):
        out[i] = table[flat[i]]
    return out.reshape(x.shape)


@numba.njit(cache=True)
def halves_to_heads(x, table, out):
    """x (S, Hkv, D) float16 bits (uint16) -> out (Hkv, S, D) float32."""
    n, hkv, d = x.shape
    for p in range(n):
        for h in range(hkv):
            for i in range(d):
                out[h, p, i] = table[x[p, h, i]]


@numba.njit(cache=True)
def codes_to_rows(kq, ks, km, vq, vs, vm, a, b, group, vgroup, bits, table, kout, vout):
    """Positions [a, b) of a q8/q4 store (a a multiple of `group`) -> kout, vout
    (b - a, Hkv, D) float32, position-major like the store (or any view of that shape: a
    transposed (Hkv, b - a, D) array is written in place)."""
    hkv, d = kq.shape[1], kout.shape[2]
    ksr = np.empty((hkv, d), np.float32)
    kmr = np.empty((hkv, d), np.float32)
    row = np.empty(d, np.float32)
    for p in range(a, b):
        if (p - a) % group == 0:  # a new key group: its scales as float32
            grp = p // group
            for h in range(hkv):
                for i in range(d):
                    ksr[h, i] = table[ks[grp, h, i]]
                    kmr[h, i] = table[km[grp, h, i]]
        for h in range(hkv):
            unpack_codes(kq, p, h, bits, d, row)
            for i in range(d):
                kout[p - a, h, i] = row[i] * ksr[h, i] + kmr[h, i]
            unpack_codes(vq, p, h, bits, d, row)
            for c in range(d // vgroup):
                sc, mn = table[vs[p, h, c]], table[vm[p, h, c]]
                for i in range(c * vgroup, (c + 1) * vgroup):
                    vout[p - a, h, i] = row[i] * sc + mn


@numba.njit(cache=True, fastmath=True)
def decode(q, kq, ks, km, vq, vs, vm, fk, fv, group, vgroup, bits, table):
    """q (Hkv, G, D) float32, already times the softmax scale; kq, vq (N, Hkv, W) uint8;
    ks, km (N/group, Hkv, D), vs, vm (N, Hkv, D/vgroup), fk, fv (R, Hkv, D) as float16 bits.
    Returns (Hkv, G, D) float32."""
    n_q, hkv, _ = kq.shape
    g, d = q.shape[1], q.shape[2]
    r = fk.shape[0]
    n_groups = n_q // group
    ksf, kmf, vsf, vmf = halves(ks, table), halves(km, table), halves(vs, table), halves(vm, table)
    fkf, fvf = halves(fk, table), halves(fv, table)
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
