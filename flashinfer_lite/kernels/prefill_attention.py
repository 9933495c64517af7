"""Causal attention of a chunk of queries (a prompt chunk, a chat turn's new tokens) over a KV
cache: the store converted to float32 a block at a time by numba kernels (kernels/kv_codes.py),
multiplied by BLAS on one thread, with an online softmax across blocks
(kernels/ops.blockwise_attention).

Why this shape (measured, SmolLM2, 14 new tokens over 2,000 cached ones, 2 cores):
- OpenBLAS's own threads fought ONNX Runtime's spinning thread pool for the same 2 cores: one
  layer's attention took 20-160 ms for ~1 ms of arithmetic. One BLAS thread here: 1.1 ms.
- numpy converts float16 one element at a time (~2.5 ns each) and dequantizing q8/q4 in numpy
  makes several full-size temporaries; the numba kernels do one pass, through a lookup table
  for float16 (numba has no float16 on CPU).
- A pure numba attention loop (no BLAS) reached ~10 GFLOP/s, single-threaded BLAS ~60.
"""

from __future__ import annotations

import functools

import numpy as np
from threadpoolctl import ThreadpoolController

from ..cache.base import KVBlock
from ..cache.quantized import QuantizedView
from .float16 import as_bits, half_table
from .kv_codes import codes_to_rows, halves_to_heads
from .ops import blockwise_attention

BLOCK = 1024  # positions converted at a time (a multiple of every q8/q4 key group)


@functools.cache
def _blas_threads() -> ThreadpoolController:
    return ThreadpoolController()


def one_blas_thread():
    """A context in which numpy's BLAS runs on the calling thread only (threadpoolctl)."""
    return _blas_threads().limit(limits=1, user_api="blas")


def float_blocks(k: np.ndarray, v: np.ndarray, pos0: int):
    """k, v (S, Hkv, D) float16 or float32 at positions pos0 ... -> KVBlocks (Hkv, n, D)."""
    for a in range(0, len(k), BLOCK):
        b = min(a + BLOCK, len(k))
        if k.dtype == np.float16:
            shape = (k.shape[1], b - a, k.shape[2])
            kf, vf = np.empty(shape, np.float32), np.empty(shape, np.float32)
            halves_to_heads(np.ascontiguousarray(k[a:b]).view(np.uint16), half_table(), kf)
            halves_to_heads(np.ascontiguousarray(v[a:b]).view(np.uint16), half_table(), vf)
        else:
            kf, vf = k[a:b].transpose(1, 0, 2), v[a:b].transpose(1, 0, 2)  # (Hkv, n, D)
        yield KVBlock(kf, vf, np.arange(pos0 + a, pos0 + b))


def _kernel_arrays(view: QuantizedView):
    """A QuantizedView's codes as the kernels take them, contiguous: (kq, ks, km, vq, vs, vm),
    scales and minimums as float16 bits (uint16)."""
    ks, km, vs, vm = (as_bits(x) for x in (view.ks, view.km, view.vs, view.vm))
    return np.ascontiguousarray(view.kq), ks, km, np.ascontiguousarray(view.vq), vs, vm


def code_blocks(view: QuantizedView, pos0: int):
    """The quantized store of a QuantizedView at positions pos0 ... -> KVBlocks (Hkv, n, D)
    float32."""
    n = len(view.kq)
    if not n:
        return
    hkv, d = view.ks.shape[1], view.ks.shape[2]
    arrays = _kernel_arrays(view)
    for a in range(0, n, BLOCK):
        b = min(a + BLOCK, n)
        kf = np.empty((hkv, b - a, d), np.float32)
        vf = np.empty((hkv, b - a, d), np.float32)
        codes_to_rows(*arrays, a, b, view.group, view.vgroup, view.bits, half_table(),
                      kf.transpose(1, 0, 2), vf.transpose(1, 0, 2))  # written as (n, Hkv, D)
        yield KVBlock(kf, vf, np.arange(pos0 + a, pos0 + b))


def codes_into(view: QuantizedView, keys: np.ndarray, values: np.ndarray) -> None:
    """The quantized store of a QuantizedView -> keys, values (N, Hkv, D) float32
    (contiguous), written in place."""
    codes_to_rows(*_kernel_arrays(view), 0, len(view.kq), view.group, view.vgroup, view.bits,
                  half_table(), keys, values)


def dequantized(view: QuantizedView) -> tuple[np.ndarray, np.ndarray]:
    """Every position of a QuantizedView in order (sinks, store, residual) as float32
    (held, Hkv, D) keys and values, the codes through the numba kernel, written in place."""
    s, n = len(view.sink_k), len(view.kq)
    shape = (s + n + len(view.res_k), *view.res_k.shape[1:])
    keys, values = np.empty(shape, np.float32), np.empty(shape, np.float32)
    keys[:s], values[:s] = view.sink_k, view.sink_v
    if n:
        codes_into(view, keys[s : s + n], values[s : s + n])
    keys[s + n :], values[s + n :] = view.res_k, view.res_v
    return keys, values


def view_blocks(view: QuantizedView, pos0: int):
    """Every position of a QuantizedView in order (sinks, store, residual) at positions
    pos0 ... -> KVBlocks (Hkv, n, D) float32."""
    s, n = len(view.sink_k), len(view.kq)
    yield from float_blocks(view.sink_k, view.sink_v, pos0)
    yield from code_blocks(view, pos0 + s)
    yield from float_blocks(view.res_k, view.res_v, pos0 + s + n)


def prefill_attention(q: np.ndarray, q_pos: np.ndarray, blocks, scale: float,
                      window: int | None) -> np.ndarray:
    """q (T, H, D) at positions q_pos over KVBlocks in position order -> (T, H * D)."""
    with one_blas_thread():
        return blockwise_attention(q, blocks, q_pos, scale, window)
