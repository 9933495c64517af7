"""The preview head: every vocabulary row quantized to a few bits, in MatMulNBits' layout.

The preview only has to rank tokens well enough that the true best ones are among its top
candidates (their exact logits come from the real rows; vocab/head.py), so it can be far coarser
than the model's own head. The flash format writes 4 bits per weight in groups of 64 with a
float32 scale and a 4-bit integer zero point per group (loaders/flash_format.PREVIEW_BITS):
2-bit previews missed the true top-1 among 128 candidates at ~1% of positions on SmolLM2,
4-bit kept it within 32 everywhere (benchmarks/bench_vocab.py). A float minimum per group would
be slightly more exact but costs 0.5 bit per weight more and an extra matmul.

Stored packed exactly as ONNX Runtime's MatMulNBits consumes it (loaders/packed_grid.py), so
loading it copies nothing; the numpy path and the tests unpack it.
"""

from __future__ import annotations

import numpy as np

from ..loaders.packed_grid import PackedGrid, pack, unpack

__all__ = ["PackedGrid", "pack", "quantize", "quantize_rows", "unpack"]


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
