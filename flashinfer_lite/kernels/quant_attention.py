"""Decode attention computed on q8/q4 codes (the numba kernel kernels/kv_codes.decode).

One query against a quantized KV cache (a cache/quantized.QuantizedView), reading the cache
once, byte by byte, never expanded to float. Measured against the ORT float16 kernel at 4096
positions: see benchmarks/bench_kv.py speed.
"""

from __future__ import annotations

import numpy as np

from ..cache.quantized import QuantizedView
from .float16 import as_bits, half_table
from .kv_codes import decode


def quantized_decode(q: np.ndarray, view: QuantizedView, scale: float) -> np.ndarray:
    """q (1, H, D) over every position of a QuantizedView -> (1, H * D) float32."""
    _, h, d = q.shape
    hkv = view.kq.shape[1]
    qg = q.reshape(hkv, h // hkv, d) * np.float32(scale)  # (1, H, D) -> (Hkv, G, D)
    bits16 = [as_bits(a) for a in (view.ks, view.km, view.vs, view.vm, view.full_k, view.full_v)]
    out = decode(np.ascontiguousarray(qg, np.float32), np.ascontiguousarray(view.kq),
                 bits16[0], bits16[1], np.ascontiguousarray(view.vq), *bits16[2:],
                 view.group, view.vgroup, view.bits, half_table())
    return out.reshape(1, h * d)
