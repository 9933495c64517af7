"""Low-bit matrices in ONNX Runtime's MatMulNBits layout (element j of a byte group in bits
[bits*j, bits*(j+1)), low first): the preview head of a flash directory is stored this way, so
loading it copies nothing, and the backends multiply by it as it is (kernels/). Made by
vocab/preview.py.
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
