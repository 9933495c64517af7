"""The preview head: every vocabulary row quantized to a few bits, in MatMulNBits' layout.

The preview only has to rank tokens well enough that the true best ones are among its top
candidates (their exact logits come from the real rows; vocab/head.py), so it can be far coarser
than the model's own head: 2 bits per weight in groups of 64 with a float32 scale and a 2-bit
integer zero point per group (2.53 bits per weight) keeps the true top-1 among the top 64
candidates at every measured position (benchmarks/bench_vocab.py). A float minimum per group
would be slightly more exact but costs 0.5 bit per weight more and an extra matmul.

Stored packed exactly as ONNX Runtime's MatMulNBits consumes it (element j of a byte group in
bits [bits*j, bits*(j+1)), low first), so loading it copies nothing; the numpy path and the
tests unpack it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PackedGrid:
    """An (n, k) matrix as `bits`-bit codes in groups of `block` along k:
    w[i, g*block + j] = scale[i, g] * (code[i, g*block + j] - zero[i, g])."""

    bits: int
    block: int
    n: int
    k: int
    codes: np.ndarray  # (n, k // block, block * bits // 8) uint8, packed
    scale: np.ndarray  # (n, k // block) float32
    zero: np.ndarray  # (n, ceil(k // block * bits / 8)) uint8, packed like the codes

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes

    def rows(self, start: int, stop: int) -> PackedGrid:
        return PackedGrid(self.bits, self.block, stop - start, self.k, self.codes[start:stop],
                          self.scale[start:stop], self.zero[start:stop])

    def dequantize(self) -> np.ndarray:
        """(n, k) float32."""
        nb = self.k // self.block
        codes = unpack(self.codes.reshape(self.n, -1), self.bits)  # (n, k)
        zero = unpack(self.zero, self.bits)[:, :nb]  # (n, nb)
        w = codes.reshape(self.n, nb, self.block).astype(np.float32)  # (n, nb, block)
        w -= zero[:, :, None]
        w *= self.scale[:, :, None]
        return w.reshape(self.n, self.k)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """(..., m) uint8 values < 2**bits -> (..., ceil(m * bits / 8)) uint8, low bits first."""
    per = 8 // bits
    m = values.shape[-1]
    pad = -m % per
    if pad:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], pad), np.uint8)], -1)
    v = values.reshape(*values.shape[:-1], -1, per).astype(np.uint8)  # (..., bytes, per)
    out = np.zeros(v.shape[:-1], np.uint8)
    for j in range(per):
        out |= v[..., j] << np.uint8(bits * j)
    return out


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack: (..., b) uint8 -> (..., b * 8 / bits) uint8."""
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    parts = [(packed >> np.uint8(bits * j)) & mask for j in range(per)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)  # (..., b * per)


def quantize(w: np.ndarray, bits: int, block: int) -> PackedGrid:
    """(n, k) float32 -> PackedGrid: per group, the affine grid spanning [min, max] with an
    integer zero point (min and max snapped so that 0 stays exactly representable)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8; got {bits}")
    n, k = w.shape
    if k % block:
        raise ValueError(f"row width {k} is not a multiple of the group size {block}")
    top = (1 << bits) - 1
    g = w.reshape(n, k // block, block)  # (n, groups, block)
    lo = np.minimum(g.min(axis=2), 0.0)
    hi = np.maximum(g.max(axis=2), 0.0)
    scale = (hi - lo) / top
    scale[scale == 0] = 1.0
    zero = np.clip(np.rint(-lo / scale), 0, top)
    codes = np.clip(np.rint(g / scale[:, :, None]) + zero[:, :, None], 0, top).astype(np.uint8)
    return PackedGrid(bits, block, n, k, pack(codes, bits),  # (n, groups, block*bits/8)
                      scale.astype(np.float32), pack(zero.astype(np.uint8), bits))


def quantize_rows(dense_rows, n: int, k: int, bits: int, block: int,
                  step: int = 8192) -> PackedGrid:
    """Quantize an (n, k) matrix a slab at a time; dense_rows(start, stop) -> float32 rows, so
    a 262k-row embedding never exists in float32 all at once."""
    nb = k // block
    zb = -(-nb * bits // 8)
    out = PackedGrid(bits, block, n, k, np.empty((n, nb, block * bits // 8), np.uint8),
                     np.empty((n, nb), np.float32), np.empty((n, zb), np.uint8))
    for s in range(0, n, step):
        e = min(n, s + step)
        part = quantize(dense_rows(s, e), bits, block)
        out.codes[s:e], out.scale[s:e], out.zero[s:e] = part.codes, part.scale, part.zero
    return out
