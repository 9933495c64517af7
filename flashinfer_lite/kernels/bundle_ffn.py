"""The sparse FFN kernel on raw bundles: the pool holds bundles exactly as they are on flash
(GGUF up-row blocks + a Q8_0 down column), so bringing a neuron into DRAM is one memcpy and the
kernel decodes blocks as it multiplies (numba, compiled once and cached on disk).

Supported row types: Q4_0, Q4_1, Q5_0, Q8_0 (what llama.cpp uses for FFN rows whose width is
not a multiple of 256) and Q4_K (the Qwen2.5 1.5B's gate and up rows); others use the decoded
pool (kernels/sparse_ffn.py). The same decoding serves the exact gate, whose rows also stay in
their GGUF blocks (`raw_matvec`, `decode_raw`). Where each 32-block keeps its fields comes from
the one table of GGUF block layouts (loaders/quant_grid.BLOCK32), passed to the kernel as
arguments: what numba compiles into its on-disk cache depends on this file alone
(kernels/kv_codes.py says why).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from gguf import GGMLQuantizationType as Q
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from ..loaders.quant_grid import BLOCK32
from .float16 import half_table
from .ggml_dot import kernel as ggml_kernel

RAW_UP_TYPES = {Q.Q4_0: 0, Q.Q4_1: 1, Q.Q5_0: 2, Q.Q8_0: 3, Q.Q4_K: 4}
DOWN_BLOCK = BLOCK32[Q.Q8_0]  # the bundles' down columns
# ...whose layout the down kernel compiles in (see add_raw_down_column; tests check the table)
Q8_BYTES, Q8_CODES = 34, 2
# Q4_K super-block (ggml's block_q4_K): d, dmin (float16), 12 bytes of packed 6-bit sub-block
# scales and minimums, 128 bytes of 4-bit codes; 256 weights in 8 sub-blocks of 32
Q4K_BYTES, Q4K_SCALES, Q4K_CODES = 144, 4, 16


def up_layout(qtype: Q) -> tuple[int, int, int, int]:
    """(kind, block bytes, offset of the codes, offset of the minimum or the 5th bits) of a
    row type, as the kernel takes them."""
    if qtype == Q.Q4_K:
        return RAW_UP_TYPES[qtype], Q4K_BYTES, Q4K_CODES, Q4K_SCALES
    lay = BLOCK32[qtype]
    extra = lay.minimum if lay.minimum is not None else (lay.high or 0)
    return RAW_UP_TYPES[qtype], lay.nbytes, lay.codes, extra


# Module level so numba's on-disk cache serves it (closures recompile in every process). Rows
# are 1-D byte views (a pool row, or a bundle where it landed in the read buffer): with the
# row as a view the 32-wide loops vectorize.


@intrinsic
def vec_dot(typingctx, fn, n, row, act):
    """ggml vec_dot at address fn over n weights: row (address of GGUF blocks) . act (address
    of quantized activations) -> float32."""
    sig = types.float32(types.int64, types.int64, types.uintp, types.uintp)

    def codegen(context, builder, signature, args):
        fn_, n_, row_, act_ = args
        i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
        vp = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i32, f32.as_pointer(), i64, vp, i64, vp, i64,
                                               i32])
        s = cgutils.alloca_once(builder, f32)  # in the entry block: not one per call in a loop
        zero = ir.Constant(i64, 0)
        builder.call(builder.inttoptr(fn_, fnty.as_pointer()),
                     [builder.trunc(n_, i32), s, zero, builder.inttoptr(row_, vp), zero,
                      builder.inttoptr(act_, vp), zero, ir.Constant(i32, 1)])
        return builder.load(s)

    return sig, codegen


@numba.njit(fastmath=True, cache=True, nogil=True, inline="always")
def half(r, o, table):
    return table[np.int64(r[o]) | (np.int64(r[o + 1]) << 8)]


@numba.njit(fastmath=True, cache=True, nogil=True, inline="always")
def q4k_scales(r, o, sc, mn):
    """The 8 sub-blocks' 6-bit scales and minimums packed in r[o:o + 12] -> sc, mn (ggml's
    get_scale_min_k4, all at once: per sub-block with a branch it cost twice the dot product)."""
    for j in range(4):
        sc[j] = np.float32(r[o + j] & 63)
        mn[j] = np.float32(r[o + j + 4] & 63)
        sc[j + 4] = np.float32((r[o + j + 8] & 15) | ((r[o + j] >> 6) << 4))
        mn[j + 4] = np.float32((r[o + j + 8] >> 4) | ((r[o + j + 4] >> 6) << 4))


@numba.njit(fastmath=True, cache=True, nogil=True, inline="always")
def q4k_dot(r, n_super, x, x_sum, table, sc, mn):
    """A row's Q4_K super-blocks r (bytes) . x (K,), x_sum (K/32,) its 32-block sums;
    w = d * sc * q - dmin * m. sc, mn: (8,) float32 scratch."""
    u = np.float32(0.0)
    for b in range(n_super):
        o = b * Q4K_BYTES
        d = half(r, o, table)
        dmin = half(r, o + 2, table)
        q4k_scales(r, o + Q4K_SCALES, sc, mn)
        acc = np.float32(0.0)
        macc = np.float32(0.0)
        for c in range(4):  # 64 weights: low nibbles are sub-block 2c, high ones 2c + 1
            lo = np.float32(0.0)
            hi = np.float32(0.0)
            xb = b * 256 + c * 64
            q0 = o + Q4K_CODES + c * 32
            for i in range(32):
                q = r[q0 + i]
                lo += np.float32(q & 15) * x[xb + i]
                hi += np.float32(q >> 4) * x[xb + 32 + i]
            acc += sc[2 * c] * lo + sc[2 * c + 1] * hi
            macc += mn[2 * c] * x_sum[b * 8 + 2 * c] + mn[2 * c + 1] * x_sum[b * 8 + 2 * c + 1]
        u += d * acc - dmin * macc
    return u


@numba.njit(fastmath=True, cache=True, nogil=True, inline="always")
def raw_up_dot(r, kind, up_blocks, size, codes, extra, x, x_sum, table, sc, mn):
    """Row r's GGUF blocks (`size` bytes each, codes at byte `codes`, the minimum or the 5th
    bits at `extra`) . x (K,), decoded as they are read; x_sum (K/32,); sc, mn: Q4_K's
    scratch."""
    if kind == 4:
        return q4k_dot(r, up_blocks // 8, x, x_sum, table, sc, mn)
    u = np.float32(0.0)
    for b in range(up_blocks):
        xb = b * 32
        acc = np.float32(0.0)
        o = b * size
        if kind == 0:  # Q4_0: d, qs[16]; w = d * (q - 8)
            for i in range(16):
                q = r[o + codes + i]
                acc += np.float32(q & 15) * x[xb + i] + np.float32(q >> 4) * x[xb + 16 + i]
            u += half(r, o, table) * (acc - 8.0 * x_sum[b])
        elif kind == 1:  # Q4_1: d, m, qs[16]; w = d * q + m
            for i in range(16):
                q = r[o + codes + i]
                acc += np.float32(q & 15) * x[xb + i] + np.float32(q >> 4) * x[xb + 16 + i]
            u += half(r, o, table) * acc + half(r, o + extra, table) * x_sum[b]
        elif kind == 2:  # Q5_0: d, qh (u32), qs[16]; w = d * (q5 - 16)
            h = o + extra
            qh = np.int64(r[h]) | (np.int64(r[h + 1]) << 8) | (np.int64(r[h + 2]) << 16) | \
                (np.int64(r[h + 3]) << 24)
            for i in range(16):
                q = np.int64(r[o + codes + i])
                lo = (q & 15) | (((qh >> i) & 1) << 4)
                hi = (q >> 4) | (((qh >> (i + 16)) & 1) << 4)
                acc += np.float32(lo) * x[xb + i] + np.float32(hi) * x[xb + 16 + i]
            u += half(r, o, table) * (acc - 16.0 * x_sum[b])
        else:  # Q8_0: d, int8[32]
            for i in range(32):
                acc += np.float32(np.int8(r[o + codes + i])) * x[xb + i]
            u += half(r, o, table) * acc
    return u


@numba.njit(fastmath=True, cache=True, nogil=True, inline="always")
def add_raw_down_column(y, a, col, d_blocks, width, table):
    """y += a * col, a down column of Q8_0 blocks (float16 scale, int8[width]). The block's
    size and field offsets are this file's constants, and width (32) an argument, on purpose:
    with the offsets as arguments or the trip count known, LLVM did not vectorize the loop
    (9.9 vs 1.7 ms for 6,272 of the 1.5B's columns, measured)."""
    for b in range(d_blocks):
        o = b * Q8_BYTES
        sc = a * half(col, o, table)
        for i in range(width):
            y[b * width + i] += sc * np.float32(np.int8(col[o + Q8_CODES + i]))


@numba.njit(fastmath=True, cache=True, nogil=True)
def ffn_raw(x, x_sum, pos, coef, counts, buf, stride, kind, size, codes, extra, up_blocks,
            down_off, d_blocks, table, out, c, fn, qx):
    """x (T, K), x_sum (T, K/32); buf: bytes holding bundles of `stride` bytes (up row as
    raw_up_dot reads it, down column as add_raw_down_column does), row t's j-th active one
    at buf[pos[t, j]:]; out (chunks, T, D): this call sums chunk c's share of each row's
    bundles into out[c] (one chunk per thread). fn != 0: the up rows' dot products by ggml's
    vec_dot at that address, over qx (T, bytes), x quantized for it (kernels/ggml_dot.py)."""
    chunks = out.shape[0]
    sc, mn = np.empty(8, np.float32), np.empty(8, np.float32)
    k = x.shape[1]
    scale = np.empty(pos.shape[1], np.float32)
    for t in range(x.shape[0]):
        y = out[c, t]
        xt, xs = x[t], x_sum[t]
        lo, hi = counts[t] * c // chunks, counts[t] * (c + 1) // chunks
        # the up rows' dot products first, then the down columns: in one loop, the call to
        # ggml kept LLVM from vectorizing the down loop (4.6 vs 2.2 ms a layer, measured)
        for j in range(lo, hi):
            p = pos[t, j]
            r = buf[p : p + stride]
            if fn != 0:
                u = vec_dot(fn, k, r.ctypes.data, qx[t].ctypes.data)
            elif kind == 4:  # called directly: through raw_up_dot's branches it ran slower
                u = q4k_dot(r, up_blocks // 8, xt, xs, table, sc, mn)
            else:
                u = raw_up_dot(r, kind, up_blocks, size, codes, extra, xt, xs, table, sc, mn)
            scale[j] = coef[t, j] * u
        for j in range(lo, hi):
            p = pos[t, j] + down_off
            add_raw_down_column(y, scale[j], buf[p : p + d_blocks * Q8_BYTES], d_blocks,
                                y.shape[0] // d_blocks, table)


@numba.njit(fastmath=True, cache=True, nogil=True)
def ffn_raw_rows(x, x_sum, pos, coef, buf, stride, kind, size, codes, extra, up_blocks,
                 down_off, d_blocks, table, out, c, fn, qx):
    """Several rows of x over one set of bundles (a verification pass: its rows share most
    neurons): x (T, K); bundle j at buf[pos[j]:], coef (T, n) its weight per row (0: not
    active there); out (chunks, T, D), chunk c's share of the bundles. Each down column is
    decoded once for all rows (ffn_raw decodes it again for every row)."""
    chunks, t_rows, k = out.shape[0], x.shape[0], x.shape[1]
    sc, mn = np.empty(8, np.float32), np.empty(8, np.float32)
    s = np.empty(t_rows, np.float32)
    width = out.shape[2] // d_blocks
    w = np.empty(width, np.float32)
    n = pos.shape[0]
    for j in range(n * c // chunks, n * (c + 1) // chunks):
        p = pos[j]
        r = buf[p : p + stride]
        any_row = False
        for t in range(t_rows):
            s[t] = 0.0
            if coef[t, j] == 0.0:
                continue
            any_row = True
            if fn != 0:
                u = vec_dot(fn, k, r.ctypes.data, qx[t].ctypes.data)
            elif kind == 4:
                u = q4k_dot(r, up_blocks // 8, x[t], x_sum[t], table, sc, mn)
            else:
                u = raw_up_dot(r, kind, up_blocks, size, codes, extra, x[t], x_sum[t], table,
                               sc, mn)
            s[t] = coef[t, j] * u
        if not any_row:
            continue
        col = buf[p + down_off : p + down_off + d_blocks * Q8_BYTES]
        for b in range(d_blocks):
            o = b * Q8_BYTES
            d = half(col, o, table)
            for i in range(width):
                w[i] = d * np.float32(np.int8(col[o + Q8_CODES + i]))
            for t in range(t_rows):
                st = s[t]
                if st != 0.0:
                    y = out[c, t, b * width : (b + 1) * width]
                    for i in range(width):
                        y[i] += st * w[i]


@numba.njit(fastmath=True, cache=True, nogil=True)
def matvec_raw(x, x_sum, raw, kind, size, codes, extra, blocks, table, out, lo, hi, fn, qx):
    """out[t, r] = row r of raw (GGUF blocks) . x[t], for rows lo..hi-1 (one chunk per
    thread); fn != 0: by ggml's vec_dot over qx, as in ffn_raw."""
    sc, mn = np.empty(8, np.float32), np.empty(8, np.float32)
    if fn != 0:
        k = x.shape[1]
        for r in range(lo, hi):
            a = raw[r].ctypes.data
            for t in range(x.shape[0]):
                out[t, r] = vec_dot(fn, k, a, qx[t].ctypes.data)
        return
    if kind == 4:  # its own loop: inside raw_up_dot's branches it ran at half the speed
        for r in range(lo, hi):
            row = raw[r]
            for t in range(x.shape[0]):
                out[t, r] = q4k_dot(row, blocks // 8, x[t], x_sum[t], table, sc, mn)
        return
    for r in range(lo, hi):
        row = raw[r]
        for t in range(x.shape[0]):
            out[t, r] = raw_up_dot(row, kind, blocks, size, codes, extra, x[t], x_sum[t],
                                   table, sc, mn)


@numba.njit(fastmath=True, cache=True, nogil=True)
def decode_raw(raw, kind, size, codes, extra, blocks, table, out):
    """raw (n, row bytes) GGUF rows -> out (n, blocks * 32) float32."""
    sc, mn = np.empty(8, np.float32), np.empty(8, np.float32)
    for s in range(raw.shape[0]):
        r, y = raw[s], out[s]
        if kind == 4:
            for b in range(blocks // 8):
                o = b * Q4K_BYTES
                d = half(r, o, table)
                dmin = half(r, o + 2, table)
                q4k_scales(r, o + Q4K_SCALES, sc, mn)
                for c in range(4):
                    q0, y0 = o + Q4K_CODES + c * 32, b * 256 + c * 64
                    a0, m0 = d * sc[2 * c], dmin * mn[2 * c]
                    a1, m1 = d * sc[2 * c + 1], dmin * mn[2 * c + 1]
                    for i in range(32):
                        y[y0 + i] = a0 * np.float32(r[q0 + i] & 15) - m0
                        y[y0 + 32 + i] = a1 * np.float32(r[q0 + i] >> 4) - m1
            continue
        for b in range(blocks):
            o = b * size
            d = half(r, o, table)
            xb = b * 32
            if kind == 3:
                for i in range(32):
                    y[xb + i] = d * np.float32(np.int8(r[o + codes + i]))
                continue
            if kind == 2:
                h = o + extra
                qh = np.int64(r[h]) | (np.int64(r[h + 1]) << 8) | \
                    (np.int64(r[h + 2]) << 16) | (np.int64(r[h + 3]) << 24)
            for i in range(16):
                q = np.int64(r[o + codes + i])
                lo, hi = q & 15, q >> 4
                if kind == 2:
                    lo = lo | (((qh >> i) & 1) << 4)
                    hi = hi | (((qh >> (i + 16)) & 1) << 4)
                    y[xb + i] = d * np.float32(lo - 16)
                    y[xb + 16 + i] = d * np.float32(hi - 16)
                elif kind == 1:
                    m = half(r, o + extra, table)
                    y[xb + i] = d * np.float32(lo) + m
                    y[xb + 16 + i] = d * np.float32(hi) + m
                else:
                    y[xb + i] = d * np.float32(lo - 8)
                    y[xb + 16 + i] = d * np.float32(hi - 8)


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


def bundle_ffn(x: np.ndarray, pos: np.ndarray, coef: np.ndarray, counts: np.ndarray,
               buf: np.ndarray, layout, chunks: int = 1) -> np.ndarray:
    """x (T, K) -> (T, D) over bundles in buf (uint8, 1-D: a pool's rows, or a read buffer
    where they landed): row t's active ones at byte positions pos[t, :counts[t]], scaled by
    coef[t]. chunks > 1 splits each row's bundles over that many threads (the kernel releases
    the GIL)."""
    return _bundle_kernel(ffn_raw, x, (pos, coef, counts, buf), layout, chunks)


def bundle_ffn_rows(x: np.ndarray, pos: np.ndarray, coef: np.ndarray, buf: np.ndarray,
                    layout, chunks: int = 1) -> np.ndarray:
    """x (T, K) -> (T, D) over one set of bundles in buf at byte positions pos (n,), row t's
    weights coef[t] (0 where the neuron is not active for it); chunks > 1 splits the bundles
    over that many threads."""
    coef = np.ascontiguousarray(coef, np.float32)
    return _bundle_kernel(ffn_raw_rows, x, (pos, coef, buf), layout, chunks)


def _bundle_kernel(kernel, x: np.ndarray, bundles: tuple, layout, chunks: int) -> np.ndarray:
    """Run ffn_raw or ffn_raw_rows (their bundle arguments: `bundles`) on x (T, K), one chunk
    per thread; -> (T, D)."""
    t, k = x.shape
    x = np.ascontiguousarray(x, np.float32)
    x_sum = x.reshape(t, k // 32, 32).sum(-1)  # (T, K/32)
    out = np.zeros((chunks, t, layout.d_model), np.float32)
    table = half_table()
    fn, qx = _ggml(x, layout.up_type)

    def run(c):
        kernel(x, x_sum, *bundles, layout.stride, *up_layout(layout.up_type), k // 32,
               layout.up_bytes, layout.d_model // 32, table, out, c, fn, qx)

    if chunks == 1:
        run(0)
        return out[0]
    list(executor(chunks).map(run, range(chunks)))
    return out.sum(0)


def raw_matvec(x: np.ndarray, raw: np.ndarray, qtype: Q, out: np.ndarray,
               chunks: int = 1) -> None:
    """out (T, n) = x (T, K) @ W.T for W's rows raw (n, row bytes) in their GGUF blocks; rows
    split over `chunks` threads. For a few rows of x (decoding): each row's blocks are decoded
    once per token as they are multiplied."""
    t, k = x.shape
    x = np.ascontiguousarray(x, np.float32)
    x_sum = x.reshape(t, k // 32, 32).sum(-1)  # (T, K/32)
    n = raw.shape[0]
    lay, table = up_layout(qtype), half_table()
    fn, qx = _ggml(x, qtype)
    if chunks == 1 or n < 256:
        matvec_raw(x, x_sum, raw, *lay, k // 32, table, out, 0, n, fn, qx)
        return
    bounds = [n * c // chunks for c in range(chunks + 1)]
    list(executor(chunks).map(
        lambda c: matvec_raw(x, x_sum, raw, *lay, k // 32, table, out, bounds[c],
                             bounds[c + 1], fn, qx), range(chunks)))


_NO_QX = np.zeros((0, 1), np.uint8)


def _ggml(x: np.ndarray, qtype: Q) -> tuple[int, np.ndarray]:
    """(ggml's vec_dot for qtype rows, x quantized for it), or (0, empty) where ggml has no
    kernel for it and the numba decoders run."""
    kern = ggml_kernel(qtype)
    if kern is None:
        return 0, _NO_QX
    return kern.vec_dot, kern.quantize(x)


def dequantize_raw(raw: np.ndarray, qtype: Q, k: int) -> np.ndarray:
    """raw (n, row bytes) GGUF rows -> (n, k) float32 (many rows of x: decode once, then BLAS)."""
    out = np.empty((raw.shape[0], k), np.float32)
    decode_raw(raw, *up_layout(qtype), k // 32, half_table(), out)
    return out


_EXECUTORS: dict[int, ThreadPoolExecutor] = {}


def executor(n: int) -> ThreadPoolExecutor:
    """A process-wide pool of n threads for the FFN kernels' chunks."""
    if n not in _EXECUTORS:
        _EXECUTORS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="ffn-kernel")
    return _EXECUTORS[n]


def warm() -> None:
    """Load (or compile) the kernels now, on empty inputs of the real calls' types. Loading
    numba's JIT machinery costs ~50 MB of RSS once per process: code, not model data, so
    benchmarks count it in the interpreter's baseline (benchmarks/bench_budget.py)."""
    x = np.zeros((0, 32), np.float32)
    table = half_table()
    ffn_raw(x, np.zeros((0, 1), np.float32), np.zeros((0, 1), np.int64),
            np.zeros((0, 1), np.float32), np.zeros(0, np.int64), np.zeros(64, np.uint8), 64,
            *up_layout(Q.Q4_0), 1, 18, 1, table, np.zeros((1, 0, 32), np.float32), 0, 0,
            _NO_QX)
    ffn_raw_rows(x, np.zeros((0, 1), np.float32), np.zeros(0, np.int64),
                 np.zeros((0, 0), np.float32), np.zeros(64, np.uint8), 64, *up_layout(Q.Q4_0),
                 1, 18, 1, table, np.zeros((1, 0, 32), np.float32), 0, 0, _NO_QX)
    rows = np.zeros((0, 18), np.uint8)
    # the gate's output is written in column slices (flash/gate.py): strided, or contiguous
    # for one row of x; no rows of W, so nothing is computed
    for out in (np.zeros((2, 4), np.float32)[:, 1:3], np.zeros((1, 2), np.float32)):
        matvec_raw(np.zeros((len(out), 32), np.float32), np.zeros((len(out), 1), np.float32),
                   rows, *up_layout(Q.Q4_0), 1, table, out, 0, 0, 0, _NO_QX)
    # whole rows (the gate) and the up or down part of gathered bundles (a strided view)
    for raw in (np.zeros((2, 18), np.uint8), np.zeros((2, 36), np.uint8)[:, :18]):
        decode_raw(raw, *up_layout(Q.Q4_0), 1, table, np.zeros((2, 32), np.float32))
    gather_rows(np.zeros(64, np.uint8), np.zeros(0, np.int64), 64, np.zeros((0, 64), np.uint8))
