"""The sparse FFN kernel on raw bundles: the pool holds bundles exactly as they are on flash
(GGUF up-row blocks + a Q8_0 down column), so bringing a neuron into DRAM is one memcpy and the
kernel decodes blocks as it multiplies (numba, compiled once and cached on disk).

Supported up-row types: Q4_0, Q4_1, Q5_0, Q8_0 (what llama.cpp uses for FFN rows whose width
is not a multiple of 256, as in both bundled models); others use the decoded pool
(kernels/sparse_ffn.py). Where each block keeps its fields comes from the one table of GGUF
block layouts (loaders/quant_grid.BLOCK32), passed to the kernel as arguments: what numba
compiles into its on-disk cache depends on this file alone (kernels/kv_codes.py says why).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from gguf import GGMLQuantizationType as Q

from ..loaders.quant_grid import BLOCK32
from .float16 import half_table

RAW_UP_TYPES = {Q.Q4_0: 0, Q.Q4_1: 1, Q.Q5_0: 2, Q.Q8_0: 3}
DOWN_BLOCK = BLOCK32[Q.Q8_0]  # the bundles' down columns


def up_layout(qtype: Q) -> tuple[int, int, int, int]:
    """(kind, block bytes, offset of the codes, offset of the minimum or the 5th bits) of an
    up-row type, as the kernel takes them."""
    lay = BLOCK32[qtype]
    extra = lay.minimum if lay.minimum is not None else (lay.high or 0)
    return RAW_UP_TYPES[qtype], lay.nbytes, lay.codes, extra


# Module level so numba's on-disk cache serves it (closures recompile in every process).


@numba.njit(fastmath=True, cache=True, nogil=True, inline="always")
def half(raw, s, o, table):
    return table[np.int64(raw[s, o]) | (np.int64(raw[s, o + 1]) << 8)]


@numba.njit(fastmath=True, cache=True, nogil=True, inline="always")
def raw_up_dot(raw, s, kind, up_blocks, size, codes, extra, x, x_sum, t, table):
    """Bundle s's up row . x[t], its GGUF blocks (`size` bytes each, codes at byte `codes`, the
    minimum or the 5th bits at `extra`) decoded as they are read."""
    u = np.float32(0.0)
    for b in range(up_blocks):
        xb = b * 32
        acc = np.float32(0.0)
        o = b * size
        if kind == 0:  # Q4_0: d, qs[16]; w = d * (q - 8)
            for i in range(16):
                q = raw[s, o + codes + i]
                acc += np.float32(q & 15) * x[t, xb + i] + \
                    np.float32(q >> 4) * x[t, xb + 16 + i]
            u += half(raw, s, o, table) * (acc - 8.0 * x_sum[t, b])
        elif kind == 1:  # Q4_1: d, m, qs[16]; w = d * q + m
            for i in range(16):
                q = raw[s, o + codes + i]
                acc += np.float32(q & 15) * x[t, xb + i] + \
                    np.float32(q >> 4) * x[t, xb + 16 + i]
            u += half(raw, s, o, table) * acc + half(raw, s, o + extra, table) * \
                x_sum[t, b]
        elif kind == 2:  # Q5_0: d, qh (u32), qs[16]; w = d * (q5 - 16)
            h = o + extra
            qh = np.int64(raw[s, h]) | (np.int64(raw[s, h + 1]) << 8) | \
                (np.int64(raw[s, h + 2]) << 16) | (np.int64(raw[s, h + 3]) << 24)
            for i in range(16):
                q = np.int64(raw[s, o + codes + i])
                lo = (q & 15) | (((qh >> i) & 1) << 4)
                hi = (q >> 4) | (((qh >> (i + 16)) & 1) << 4)
                acc += np.float32(lo) * x[t, xb + i] + \
                    np.float32(hi) * x[t, xb + 16 + i]
            u += half(raw, s, o, table) * (acc - 16.0 * x_sum[t, b])
        else:  # Q8_0: d, int8[32]
            for i in range(32):
                acc += np.float32(np.int8(raw[s, o + codes + i])) * x[t, xb + i]
            u += half(raw, s, o, table) * acc
    return u


@numba.njit(fastmath=True, cache=True, nogil=True, inline="always")
def add_raw_down_column(y, a, raw, s, down_off, d_blocks, d_size, d_codes, table):
    """y += a * bundle s's down column: Q8_0 blocks (float16 scale, int8[32] at d_codes;
    d_size bytes each) at down_off."""
    for b in range(d_blocks):
        o = down_off + b * d_size
        sc = a * half(raw, s, o, table)
        for i in range(32):
            y[b * 32 + i] += sc * np.float32(np.int8(raw[s, o + d_codes + i]))


@numba.njit(fastmath=True, cache=True, nogil=True)
def ffn_raw(x, x_sum, slots, coef, counts, raw, kind, size, codes, extra, up_blocks,
            down_off, d_blocks, d_size, d_codes, table, out, c):
    """x (T, K), x_sum (T, K/32); raw (P, stride) bundles (up row as raw_up_dot reads it,
    down column as add_raw_down_column does); out (chunks, T, D): this call sums chunk c's
    share of each row's slots into out[c] (one chunk per thread)."""
    chunks = out.shape[0]
    for t in range(x.shape[0]):
        y = out[c, t]
        for j in range(counts[t] * c // chunks, counts[t] * (c + 1) // chunks):
            s = slots[t, j]
            u = raw_up_dot(raw, s, kind, up_blocks, size, codes, extra, x, x_sum, t, table)
            add_raw_down_column(y, coef[t, j] * u, raw, s, down_off, d_blocks, d_size,
                                d_codes, table)


@numba.njit(cache=True, nogil=True)
def gather_rows(src, pos, width, out):
    """out[i, :width] = src[pos[i] : pos[i] + width]: bundles out of the read staging buffer.
    Through row and slice views: indexing src[p + j] and out[i, j] directly kept LLVM from
    vectorizing the copy (0.75 vs 0.09 ms for 750 1 KiB bundles, measured); numpy's fancy
    indexing needs an (n, width) int64 index array (~2 ms per layer)."""
    for i in range(len(pos)):
        p = pos[i]
        o = out[i]
        s = src[p : p + width]
        for j in range(width):
            o[j] = s[j]


def bundle_ffn(x: np.ndarray, slots: np.ndarray, coef: np.ndarray, counts: np.ndarray,
               pool, chunks: int = 1) -> np.ndarray:
    """x (T, K) -> (T, D) over each row's active slots of a RawNeuronPool; chunks > 1 splits
    each row's slots over that many threads (the kernel releases the GIL)."""
    t, k = x.shape
    x = np.ascontiguousarray(x, np.float32)
    x_sum = x.reshape(t, k // 32, 32).sum(-1)  # (T, K/32)
    out = np.zeros((chunks, t, pool.d_out), np.float32)
    lay = pool.layout
    table = half_table()

    def run(c):
        ffn_raw(x, x_sum, slots, coef, counts, pool.raw, *up_layout(lay.up_type), k // 32,
                lay.up_bytes, lay.d_model // 32, DOWN_BLOCK.nbytes, DOWN_BLOCK.codes, table,
                out, c)

    if chunks == 1:
        run(0)
        return out[0]
    list(executor(chunks).map(run, range(chunks)))
    return out.sum(0)


_EXECUTORS: dict[int, ThreadPoolExecutor] = {}


def executor(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of n threads for the FFN kernels' chunks."""
    if n not in _EXECUTORS:
        _EXECUTORS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="ffn-kernel")
    return _EXECUTORS[n]


def warm() -> None:
    """Load (or compile) the kernel now, on empty inputs of the real call's types. Loading
    numba's JIT machinery costs ~50 MB of RSS once per process: code, not model data, so
    benchmarks count it in the interpreter's baseline (benchmarks/bench_budget.py)."""
    x = np.zeros((0, 32), np.float32)
    ffn_raw(x, np.zeros((0, 1), np.float32), np.zeros((0, 1), np.int64),
            np.zeros((0, 1), np.float32), np.zeros(0, np.int64), np.zeros((1, 64), np.uint8),
            *up_layout(Q.Q4_0), 1, 18, 1, DOWN_BLOCK.nbytes, DOWN_BLOCK.codes,
            half_table(), np.zeros((1, 0, 32), np.float32), 0)
    gather_rows(np.zeros(64, np.uint8), np.zeros(0, np.int64), 64, np.zeros((0, 64), np.uint8))
