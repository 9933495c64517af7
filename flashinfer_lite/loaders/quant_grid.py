"""GGUF quant blocks decoded into an integer grid with per-block scales and minimums.

The `gguf` package dequantizes blocks to floats, which is what the reference path needs. The
compact CPU path (ONNX Runtime's MatMulNBits) instead needs the integers themselves plus one scale
(and optionally one additive minimum) per block, so that a 4-bit GGUF tensor stays 4-bit in
memory. `gguf` does not expose that decomposition, so we decode the bit fields here (layouts from
ggml-quants.c) and the tests check every type against `gguf.quants.dequantize`.

Every supported type becomes, exactly (up to float32 rounding of scale products):

    w[n, b*block + j] = scale[n, b] * (q[n, b*block + j] - zero) + minimum[n, b]

with q unsigned, `zero` = 2**(bits-1) (MatMulNBits' default zero point, so no zero-point tensor is
stored), and `minimum` None where the type has none.

The 32-element types' block layouts (`BLOCK32`) and their fields (`block32_fields`, written once
for any array module: numpy here, MLX in flash/mlx_ffn.py) are shared with the other decoders of
GGUF blocks; the numba FFN kernel (kernels/bundle_ffn.py) decodes inside its dot products and
takes its byte offsets from `BLOCK32`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import UnsupportedModelError

Q = GGMLQuantizationType


@dataclass
class QuantGrid:
    """One 2-D weight (rows N, columns K) as unsigned integers + per-block scale/minimum."""

    bits: int  # 4 or 8: the width MatMulNBits stores
    block: int  # elements per scale (32, or 16 for Q6_K)
    q: np.ndarray  # (N, K) uint8, values in [0, 2**bits)
    scale: np.ndarray  # (N, K // block) float32
    minimum: np.ndarray | None  # (N, K // block) float32, or None

    @property
    def zero(self) -> int:
        return 1 << (self.bits - 1)

    def dequantize(self) -> np.ndarray:
        n, k = self.q.shape
        w = self.q.astype(np.float32).reshape(n, k // self.block, self.block) - self.zero
        w *= self.scale[:, :, None]
        if self.minimum is not None:
            w += self.minimum[:, :, None]
        return w.reshape(n, k)


@dataclass(frozen=True)
class Block32:
    """Where a 32-element GGUF block keeps its fields (ggml-quants.c's block_q*): the float16
    scale d at byte 0, then an optional float16 minimum m, an optional u32 of 5th bits (bit j:
    element j), and the codes (16 bytes of nibbles, byte i: element i low, i + 16 high; Q8_0:
    32 int8). w = d * (code - zero) + m."""

    nbytes: int
    minimum: int | None  # byte offset of m
    high: int | None  # byte offset of the 5th bits
    codes: int  # byte offset of the codes
    zero: int  # subtracted from the unsigned code (Q8_0's codes are signed: 0)


BLOCK32 = {
    Q.Q4_0: Block32(18, None, None, 2, 8),
    Q.Q4_1: Block32(20, 2, None, 4, 0),
    Q.Q5_0: Block32(22, None, 2, 6, 16),
    Q.Q5_1: Block32(24, 2, 4, 8, 0),
    Q.Q8_0: Block32(34, None, None, 2, 0),
}


def half(xp, blocks, at: int):
    """The float16 at byte `at` of every block (..., nbytes) uint8 -> (..., 1) float32.
    xp: the array module (numpy, or mlx.core)."""
    lo = blocks[..., at : at + 1].astype(xp.uint16)
    hi = blocks[..., at + 1 : at + 2].astype(xp.uint16)
    return (lo | (hi << 8)).view(xp.float16).astype(xp.float32)


def block32_fields(xp, blocks, qtype: Q):
    """Blocks (..., nbytes) uint8 of a 32-element type -> (q, d, m): the codes (..., 32) in
    element order (uint8 with their 5th bit; Q8_0: int8), d (..., 1) float32 and m (..., 1)
    float32 or None. xp: the array module (numpy, or mlx.core)."""
    lay = BLOCK32[qtype]
    d = half(xp, blocks, 0)
    m = None if lay.minimum is None else half(xp, blocks, lay.minimum)
    if qtype == Q.Q8_0:
        return blocks[..., lay.codes : lay.codes + 32].view(xp.int8), d, m
    qs = blocks[..., lay.codes : lay.codes + 16]
    q = xp.concatenate([qs & 15, qs >> 4], axis=-1)  # byte i: element i low, i + 16 high
    if lay.high is not None:
        b = blocks[..., lay.high : lay.high + 4].astype(xp.uint32)  # little-endian u32
        qh = b[..., 0:1] | (b[..., 1:2] << 8) | (b[..., 2:3] << 16) | (b[..., 3:4] << 24)
        high = ((qh >> xp.arange(32, dtype=xp.uint32)) & 1) << 4  # (..., 32)
        q = (q.astype(xp.uint32) | high).astype(xp.uint8)
    return q, d, m


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of packed 6-bit (scale, min) for 8 sub-blocks -> (nb, 8) each."""
    s = scales.astype(np.uint8)
    sc = np.empty((s.shape[0], 8), np.uint8)
    mn = np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def _decode_blocks(qtype: Q, blocks: np.ndarray):
    """blocks (nb, type_size) uint8 -> (bits, block, q (nb, per_block), scale, minimum)."""
    nb = blocks.shape[0]
    if qtype in BLOCK32:
        q, d, m = block32_fields(np, blocks, qtype)
        if qtype == Q.Q8_0:
            return 8, 32, (q.astype(np.int16) + 128).astype(np.uint8), d, None
        if qtype == Q.Q4_0:
            return 4, 32, q, d, None
        if qtype == Q.Q4_1:  # d*q + m == d*(q - 8) + (m + 8d): the zero point into the minimum
            return 4, 32, q, d, m + 8 * d
        if qtype == Q.Q5_0:  # d*(q5 - 16) == d*((q5 + 112) - 128)
            return 8, 32, q + 112, d, None
        return 8, 32, q + 128, d, m  # Q5_1
    if qtype in (Q.Q4_K, Q.Q5_K):
        d, dmin = half(np, blocks, 0), half(np, blocks, 2)
        sc, mn = _k_scales(blocks[:, 4:16])
        scale = d * sc  # (nb, 8)
        minimum = -dmin * mn
        if qtype == Q.Q4_K:
            qs = blocks[:, 16:144].reshape(nb, 4, 32)  # (nb, pair of sub-blocks, 32)
            q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 256)
            return 4, 32, q, scale, minimum + 8 * scale
        qh = blocks[:, 16:48]  # (nb, 32): bit s of byte l is the 5th bit of sub-block s, elem l
        qs = blocks[:, 48:176].reshape(nb, 4, 32)
        low = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 8, 32)
        high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (nb, 8, 32)
        q = (low | (high << 4)).reshape(nb, 256)
        return 8, 32, q + 128, scale, minimum
    if qtype == Q.Q6_K:
        ql = blocks[:, 0:128].reshape(nb, 2, 64)  # (nb, half, 64)
        qh = blocks[:, 128:192].reshape(nb, 2, 32)
        sc = blocks[:, 192:208].view(np.int8).astype(np.float32)  # (nb, 16)
        d = half(np, blocks, 208)
        groups = [
            (ql[:, :, :32] & 0x0F) | ((qh & 3) << 4),
            (ql[:, :, 32:] & 0x0F) | (((qh >> 2) & 3) << 4),
            (ql[:, :, :32] >> 4) | (((qh >> 4) & 3) << 4),
            (ql[:, :, 32:] >> 4) | (((qh >> 6) & 3) << 4),
        ]
        q = np.stack(groups, axis=2).reshape(nb, 256)  # (nb, half, group, 32) -> 256
        # d*sc*(q - 32) == d*sc*((q + 96) - 128); sub-block of 16 elements e uses scales[e // 16]
        return 8, 16, q + 96, d * sc, None
    raise UnsupportedModelError(f"quant type {qtype.name} has no integer decoding")


INTEGER_TYPES = frozenset({Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K})
FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})
SUPPORTED_TYPES = INTEGER_TYPES | FLOAT_TYPES


def decode_grid(qtype: Q, raw: np.ndarray, shape: tuple[int, int], rows_per_step: int = 4096):
    """Raw GGUF bytes of an (N, K) tensor -> QuantGrid, decoded a slab of rows at a time.

    raw: (N, K // per_block * type_size) uint8, e.g. a memory-mapped view; only the integer grid
    and scales are materialized, never a float32 copy of the whole tensor.
    """
    if qtype not in INTEGER_TYPES:
        raise UnsupportedModelError(f"quant type {qtype.name} has no integer decoding")
    n, k = shape
    per_block, type_size = GGML_QUANT_SIZES[qtype]
    raw = raw.reshape(n, (k // per_block) * type_size)
    grid = None
    for start in range(0, n, rows_per_step):
        chunk = np.ascontiguousarray(raw[start : start + rows_per_step])
        rows = chunk.shape[0]
        bits, block, q, sc, mn = _decode_blocks(qtype, chunk.reshape(-1, type_size))
        if grid is None:  # preallocate: slabs are written in place, never concatenated
            grid = QuantGrid(bits=bits, block=block, q=np.empty((n, k), np.uint8),
                             scale=np.empty((n, k // block), np.float32),
                             minimum=None if mn is None else np.empty((n, k // block),
                                                                       np.float32))
        grid.q[start : start + rows] = q.reshape(rows, k)
        grid.scale[start : start + rows] = np.asarray(sc, np.float32).reshape(rows, k // block)
        if mn is not None:
            grid.minimum[start : start + rows] = np.asarray(mn, np.float32).reshape(
                rows, k // block)
    return grid
