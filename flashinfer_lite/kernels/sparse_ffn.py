"""The sparse FFN kernel over a neuron pool's rows (numba).

For each token row t and each active pool slot s with gate activation a[t, j]:
    u = up_row[s] . x[t]                    (4-bit or 8-bit grid, per-block scale + minimum)
    out[t] += a[t, j] * u * down_col[s]     (int8 Q8_0 column, per-32 scale)
The pool's rows change every token, so ONNX Runtime (fast on static initializers, slow on
weights fed as inputs) does not fit; numba compiles this once (cached on disk). Loops are kept
simple, in float32, with one accumulator per output row, so LLVM vectorizes them.
"""

from __future__ import annotations

import numba
import numpy as np

from .bundle_ffn import executor

# Module level, not built in a closure: numba's on-disk cache only serves module-level
# functions (closures were recompiled, and re-cached, in every process). This module is
# imported only when a flash-resident FFN is set up.


@numba.njit(fastmath=True, cache=True, nogil=True, inline="always")
def add_down_column(y, a, s, dn_q, dn_s):
    """y += a * (Q8_0 down column of pool row s): int8 values, one scale per 32."""
    for b in range(dn_s.shape[1]):
        sc = a * dn_s[s, b]
        for i in range(32):
            y[b * 32 + i] += sc * np.float32(dn_q[s, b * 32 + i])


@numba.njit(fastmath=True, cache=True, nogil=True, inline="always")
def up_dot(xa, xb, x_sum, t, up_q, up_s, up_m, s, zero, width):
    """Pool row s's up row . x[t], block by block (`width` bytes each): scale * (codes . x -
    zero * sum(x)) + minimum * sum(x). 4-bit rows: byte i of a block holds elements 2i (low
    nibble) and 2i+1 (high), xa and xb are x's even and odd elements; 8-bit rows: one byte
    per element, xa is x and xb is None."""
    nb = up_s.shape[1]
    u = np.float32(0.0)
    for b in range(nb):
        acc = np.float32(0.0)
        base = b * width
        if xb is None:
            for i in range(width):
                acc += np.float32(up_q[s, base + i]) * xa[t, base + i]
        else:
            for i in range(width):
                byte = up_q[s, base + i]
                acc += np.float32(byte & 15) * xa[t, base + i] + \
                    np.float32(byte >> 4) * xb[t, base + i]
        u += up_s[s, b] * (acc - zero * x_sum[t, b]) + up_m[s, b] * x_sum[t, b]
    return u


@numba.njit(fastmath=True, cache=True, nogil=True)
def ffn(xa, xb, x_sum, slots, coef, counts, up_q, up_s, up_m, zero, width, dn_q, dn_s, out,
        c):
    """4-bit or 8-bit up rows (xa, xb, width as up_dot's); out (chunks, T, D): this call sums
    chunk c's share of each row's slots into out[c]. numba compiles one version for an array
    xb and one for None, each without the other's branch (`xb is None` is settled by the
    argument's type), so each is the loop a kernel of its own would be. width is passed, not
    computed from the shapes here: that measured 5-7% slower on 16-element blocks."""
    chunks = out.shape[0]
    for t in range(xa.shape[0]):
        y = out[c, t]
        for j in range(counts[t] * c // chunks, counts[t] * (c + 1) // chunks):
            s = slots[t, j]
            u = up_dot(xa, xb, x_sum, t, up_q, up_s, up_m, s, zero, width)
            add_down_column(y, coef[t, j] * u, s, dn_q, dn_s)


def sparse_ffn(x: np.ndarray, block: int, slots: np.ndarray, coef: np.ndarray,
               counts: np.ndarray, pool, chunks: int = 1) -> np.ndarray:
    """x (T, K) float32 -> (T, D): sum over each row's active slots (see module docstring)."""
    t, k = x.shape
    x = np.ascontiguousarray(x, np.float32)
    x_sum = x.reshape(t, k // block, block).sum(-1)  # (T, nb)
    out = np.zeros((chunks, t, pool.d_out), np.float32)
    zero = np.float32(pool.zero)
    if pool.bits == 4:  # nibble pairs meet contiguous x: (T, K/2) even and odd elements
        xa, xb = np.ascontiguousarray(x[:, 0::2]), np.ascontiguousarray(x[:, 1::2])
        width = block // 2
    else:
        xa, xb, width = x, None, block

    def run(c):
        ffn(xa, xb, x_sum, slots, coef, counts, pool.up_q, pool.up_s, pool.up_m, zero, width,
            pool.dn_q, pool.dn_s, out, c)

    if chunks == 1:
        run(0)
    else:  # the kernels release the GIL (nogil): one chunk per thread
        list(executor(chunks).map(run, range(chunks)))
    return out.sum(0)
