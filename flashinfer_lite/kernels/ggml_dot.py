"""Dot products of GGUF-block rows with llama.cpp's own CPU kernels (ggml's vec_dot), called
from numba.

Our numba kernels (kernels/bundle_ffn.py) decode each block in scalar code: on the 1.5B's Q4_K
gate rows they ran at 3.5 GB/s on one core, ggml's SIMD vec_dot at 13.7 (measured on one
layer's 8,960 rows). ggml has no entry point for "these rows, scattered in a buffer, times these
activations", and a ctypes call per row costs more than the dot product, so the numba loops call
ggml's function pointers directly: ggml_get_type_traits_cpu (ggml-cpu.h, public) gives each
type's vec_dot and the activation format it pairs with (Q8_K for K-quants, Q8_0 / Q8_1 for the
32-blocks), and a numba intrinsic emits the indirect call. The function's address is an argument,
so numba's on-disk cache holds no process-specific pointer; the call itself
(kernels/bundle_ffn.vec_dot) lives beside the kernels that inline it, because numba's cache of a
file is invalidated by changes to that file only.

Activations are quantized as llama.cpp quantizes them (8 bits, blocks of 32 or 256): a token's
result matches llama.cpp's, not the float dot product (~0.7% relative difference on random
activations). The library is llama-cpp-python's (already loaded for the tokenizer); where it
lacks a symbol or a type, `Ggml.load` returns None and the numba kernels are used.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q


class _TypeTraitsCpu(ctypes.Structure):
    # struct ggml_type_traits_cpu (ggml-cpu.h)
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


@dataclass(frozen=True)
class DotKernel:
    """One weight type's vec_dot and how to quantize activations for it."""
    weight_type: Q
    vec_dot: int  # void (*)(int n, float *s, size_t bs, const void *x, size_t bx,
    #                        const void *y, size_t by, int nrc)
    from_float: int  # void (*)(const float *x, void *y, int64_t k)
    act_type: Q
    _quantize: object
    act_block: int  # weights per activation block
    act_block_bytes: int  # its bytes, as this build of ggml lays it out

    def act_bytes(self, k: int) -> int:
        return k // self.act_block * self.act_block_bytes

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """x (T, K) float32 -> (T, act_bytes(K)) uint8 in ggml's activation blocks."""
        x = np.ascontiguousarray(x, np.float32)
        t, k = x.shape
        out = np.empty((t, self.act_bytes(k)), np.uint8)
        for r in range(t):
            self._quantize(x[r].ctypes.data, out[r].ctypes.data, k)
        return out


_STATE: dict[str, object] = {}


def kernel(qtype: Q) -> DotKernel | None:
    """ggml's dot kernel for rows of qtype, or None where the library or the type is missing
    (or FLASHINFER_LITE_GGML_DOT=0)."""
    if "lib" not in _STATE:
        _STATE["lib"] = _open()
        _STATE["kernels"] = {}
    lib = _STATE["lib"]
    if lib is None:
        return None
    cache = _STATE["kernels"]
    if qtype not in cache:
        cache[qtype] = _make(lib, qtype)
    return cache[qtype]


def reset() -> None:
    """Forget the library and kernels found, so the next kernel() looks again (after changing
    FLASHINFER_LITE_GGML_DOT)."""
    _STATE.clear()


def _open():
    if os.environ.get("FLASHINFER_LITE_GGML_DOT", "1") == "0":
        return None
    try:
        import llama_cpp
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so")
    try:
        lib = ctypes.CDLL(path)
        lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TypeTraitsCpu)
        lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        lib.ggml_cpu_init()  # fills ggml's conversion tables, once per process
        base = ctypes.CDLL(os.path.join(os.path.dirname(path), "libggml-base.so"))
        base.ggml_type_size.restype = ctypes.c_size_t
        base.ggml_blck_size.restype = ctypes.c_int64
        lib.base = base
    except (OSError, AttributeError):
        return None
    return lib


def _make(lib, qtype: Q) -> DotKernel | None:
    tr = lib.ggml_get_type_traits_cpu(int(qtype)).contents
    if not tr.vec_dot or tr.nrows != 1:
        return None
    act = lib.ggml_get_type_traits_cpu(tr.vec_dot_type).contents
    if not act.from_float:
        return None
    quantize = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(
        act.from_float)
    # block sizes from this ggml build, not gguf's table (its Q8_1 is an older 40-byte layout)
    vt = ctypes.c_int(tr.vec_dot_type)
    return DotKernel(qtype, tr.vec_dot, act.from_float, Q(tr.vec_dot_type), quantize,
                     int(lib.base.ggml_blck_size(vt)), int(lib.base.ggml_type_size(vt)))
