"""GGUF weights as MLX affine groups (kernels/mlx_backend.py multiplies by them; the pipelined
decode's embedding, kernels/mlx_decode.py, gathers rows of them).

MLX's quantized matmul takes affine groups along a row, `w = scale * q + bias` with q unsigned
of 2..8 bits and groups of 32, 64 or 128. Our integer decoding of GGUF blocks
(loaders/quant_grid.py) gives `w = scale * (q - zero) + minimum`, so every type whose scale covers
32 elements maps without loss by `bias = minimum + scale * (offset - zero)`:

    Q4_0, Q4_1, Q4_K          -> 4-bit groups of 32 (Q4_K's sub-blocks are groups of 32)
    Q5_0, Q5_1, Q5_K          -> 5-bit groups of 32 (our grid stores them as 8-bit; shifted back)
    Q8_0                      -> 8-bit groups of 32
    Q6_K                      -> its scales cover 16 elements, which MLX cannot group: dequantized
                                 and requantized to 8-bit groups of 32 (max error 1/8 of a Q6_K
                                 step; Gemma 3 270M has it in half of its ffn_down tensors)
    F32, F16, BF16            -> dense float32
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

from ..loaders.quant_grid import FLOAT_TYPES, QuantGrid, decode_grid

GROUP = 32
# GGUF types stored by quant_grid as 8-bit whose integers span 5 bits: (MLX bits, q offset)
_NARROW = {Q.Q5_0: (5, 112), Q.Q5_1: (5, 128), Q.Q5_K: (5, 128)}


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers (N, K) < 2**bits -> MLX's packing (N, K * bits / 32) uint32: a
    little-endian bit stream per row, element j at bits [j*bits, (j+1)*bits)."""
    n, k = q.shape
    if bits == 8:
        return np.ascontiguousarray(q, np.uint8).view(np.uint32)
    if bits == 4:
        return np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4)).view(np.uint32)
    stream = (q[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1  # (N, K, bits), LSB first
    return np.packbits(stream.reshape(n, k * bits), axis=1, bitorder="little").view(np.uint32)


class MlxQuantized:
    """One weight as MLX affine groups: packed (N, K*bits/32) uint32, scales/biases (N, K/32)."""

    def __init__(self, packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int):
        self.packed, self.scales, self.biases, self.bits = packed, scales, biases, bits

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.biases.nbytes

    def dequantize(self) -> np.ndarray:
        """Float32 (N, K), for tests."""
        n = self.packed.shape[0]
        k = self.packed.shape[1] * 32 // self.bits
        stream = np.unpackbits(self.packed.view(np.uint8), axis=1, bitorder="little")
        q = (stream.reshape(n, k, self.bits) << np.arange(self.bits, dtype=np.uint8)).sum(-1)
        w = q.astype(np.float32).reshape(n, k // GROUP, GROUP)  # (N, groups, 32)
        return (w * self.scales[..., None] + self.biases[..., None]).reshape(n, k)


def grid_to_mlx(grid: QuantGrid, qtype: Q) -> MlxQuantized:
    """An integer grid (loaders/quant_grid.py) -> MLX affine groups of 32, exactly where the
    type's scales cover 32 elements (see the module docstring for Q6_K)."""
    n, k = grid.q.shape
    if grid.block != GROUP:  # Q6_K: 16-element scales
        w = grid.dequantize().reshape(n, k // GROUP, GROUP)  # (N, groups, 32)
        lo, hi = w.min(-1), w.max(-1)
        scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
        q = np.clip(np.rint((w - lo[..., None]) / scale[..., None]), 0, 255).astype(np.uint8)
        return MlxQuantized(pack_bits(q.reshape(n, k), 8), scale, lo.astype(np.float32), 8)
    bits, offset = _NARROW.get(qtype, (grid.bits, 0))
    q = grid.q - np.uint8(offset) if offset else grid.q
    scale = grid.scale
    bias = scale * np.float32(offset - grid.zero)
    if grid.minimum is not None:
        bias = bias + grid.minimum
    return MlxQuantized(pack_bits(q, bits), scale.astype(np.float32), bias.astype(np.float32),
                        bits)


def to_mlx_weight(f, name: str, rows: tuple[int, int] | None = None):
    """A GGUF tensor (or its rows) -> MlxQuantized, or a float32 (N, K) array."""
    t = f.tensor(name)
    if len(t.shape) == 1:
        return np.asarray(f.dense(name), np.float32)
    n, k = t.shape
    start, stop = rows if rows is not None else (0, n)
    if t.qtype in FLOAT_TYPES or k % GROUP:
        return np.ascontiguousarray(f.dense(name)[start:stop], np.float32)
    grid = decode_grid(t.qtype, t.raw[start:stop], (stop - start, k))
    return grid_to_mlx(grid, t.qtype)
