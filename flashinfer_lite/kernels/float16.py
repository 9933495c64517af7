"""float16 read as its bits, for kernels: numba has no float16 on CPU, so the numba kernels
(kernels/kv_codes.py, kernels/bundle_ffn.py) take float16 values as uint16 bits and look each
up in one table, passed to them as an argument.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def half_table() -> np.ndarray:
    """float32 value of every float16 bit pattern (65536 entries, 256 KiB), built once."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(
        np.float32)


def as_bits(x: np.ndarray) -> np.ndarray:
    """x as contiguous float16 bits (uint16), the form the kernels read."""
    return np.ascontiguousarray(x, np.float16).view(np.uint16)
