"""The MLX backend: the same segments (kernels/base.py) on an Apple GPU (mlx-metal), an NVIDIA GPU
(mlx-cuda) or MLX's CPU device, with GGUF weights kept quantized.

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

Activations stay float32. Segments are lazy MLX graphs: nothing runs until a result is read on
the host, so with the attention core and KV cache on the device too (kernels/mlx_attention.py)
one decode step is one synchronization, at the logits.
"""

from __future__ import annotations

import importlib.util

import numpy as np
from gguf import GGMLQuantizationType as Q

from ..errors import BackendUnavailableError
from ..loaders.packed_grid import unpack
from ..loaders.quant_grid import FLOAT_TYPES, QuantGrid, decode_grid
from .base import Backend, GraphBuilder, Segment
from .mlx_attention import MlxAttentionCore, MlxKVCache, device_cache_supports

GROUP = 32
# GGUF types stored by quant_grid as 8-bit whose integers span 5 bits: (MLX bits, q offset)
_NARROW = {Q.Q5_0: (5, 112), Q.Q5_1: (5, 128), Q.Q5_K: (5, 128)}


def mlx_installed() -> bool:
    return importlib.util.find_spec("mlx") is not None


def mlx_gpu_available() -> bool:
    """True when MLX is installed and its GPU (Metal or CUDA) backend works here."""
    if not mlx_installed():
        return False
    try:
        import mlx.core as mx  # optional: the [mlx] / [cuda] extras

        return bool(mx.is_available(mx.gpu))
    except Exception:  # a CPU-only build, or a GPU build without a driver
        return False


def _mx():
    try:
        import mlx.core as mx  # optional: the [mlx] / [cuda] extras
    except ImportError as exc:
        raise BackendUnavailableError(
            "the MLX backend needs mlx: pip install 'flashinfer-lite[mlx]' (macOS) or "
            "'flashinfer-lite[cuda]' (Linux with an NVIDIA GPU)") from exc
    return mx


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


_GELU_C = float(np.sqrt(2.0 / np.pi))


class _MlxBuilder(GraphBuilder):
    """Builds the segment's MLX graph on each call (MLX is lazy: building is cheap, and the
    work runs when a result is needed). Weights are converted and moved on first use."""

    def __init__(self, f, mx):
        self.f, self.mx = f, mx
        self.weights: dict = {}
        self.nbytes = 0

    def _weight(self, name, rows=None):
        key = (name, rows)
        if key not in self.weights:
            w = to_mlx_weight(self.f, name, rows)
            mx = self.mx
            if isinstance(w, MlxQuantized):
                self.nbytes += w.nbytes
                w = (mx.array(w.packed), mx.array(w.scales), mx.array(w.biases), w.bits, GROUP)
            else:
                self.nbytes += w.nbytes
                w = mx.array(w)
            self.weights[key] = w
        return self.weights[key]

    def linear(self, x, weight, bias=None, rows=None):
        w = self._weight(weight, rows)
        y = self._qmm(x, w) if isinstance(w, tuple) else x @ w.T
        return y if bias is None else y + self._weight(bias)

    def _qmm(self, x, w):
        packed, scales, biases, bits, group = w
        return self.mx.quantized_matmul(x, packed, scales, biases, transpose=True,
                                        group_size=group, bits=bits)

    def linear_packed(self, x, grid):
        """The preview head's loaders/packed_grid.PackedGrid: MatMulNBits' packing (low bits first)
        is MLX's bit stream, and scale * (code - zero) is MLX's affine group with
        bias = -scale * zero, so it maps without copying the codes' values."""
        key = ("packed", id(grid))
        if key not in self.weights:
            mx = self.mx
            nb = grid.k // grid.block
            zero = unpack(grid.zero, grid.bits)[:, :nb].astype(np.float32)  # (n, groups)
            packed = np.ascontiguousarray(grid.codes.reshape(grid.n, -1)).view(np.uint32)
            scale = np.asarray(grid.scale, np.float32)
            self.nbytes += packed.nbytes + 2 * scale.nbytes
            self.weights[key] = (mx.array(packed), mx.array(scale), mx.array(-scale * zero),
                                 grid.bits, grid.block)
        return self._qmm(x, self.weights[key])

    def rms_norm(self, x, weight, eps):
        return self.mx.fast.rms_norm(x, self._weight(weight), eps)

    def add(self, a, b):
        return a + b

    def mul(self, a, b):
        return a * b

    def activation(self, x, kind):
        mx = self.mx
        if kind == "silu":
            return x * mx.sigmoid(x)
        if kind == "gelu_tanh":
            return 0.5 * x * (1.0 + mx.tanh(_GELU_C * (x + 0.044715 * x * x * x)))
        raise ValueError(f"unknown activation {kind!r}")


class MlxSegment(Segment):
    """Inputs: numpy or MLX arrays; outputs: lazy MLX arrays (np.asarray reads one back).

    Once its weights are loaded, the segment is `mx.compile`d: the graph is traced once per
    input shape and replayed, with elementwise chains fused. Building the graph op by op cost
    76 us per decode call, the compiled call 20 us (MLX CPU here); on a GPU a decode step is
    ~60 such calls, so this is launch and Python overhead, not arithmetic."""

    def __init__(self, f, fn, mx):
        self.mx, self.fn = mx, fn
        self.builder = _MlxBuilder(f, mx)
        self._run = None

    def freeze(self) -> None:
        """Compile: every weight is loaded, so tracing reads no file."""
        self._run = self.mx.compile(lambda *xs: list(self.fn(self.builder, *xs)))

    def __call__(self, *inputs):
        mx = self.mx
        xs = [a if isinstance(a, mx.array) else mx.array(np.asarray(a, np.float32))
              for a in inputs]
        if self._run is not None:
            return self._run(*xs)
        return list(self.fn(self.builder, *xs))

    @property
    def nbytes(self):
        return self.builder.nbytes


class MlxBackend(Backend):
    name = "mlx"

    def __init__(self, device: str | None = None):
        """device: None (MLX's default: the GPU where there is one), "gpu" or "cpu"."""
        self.mx = mx = _mx()
        if device is not None:
            if device not in ("gpu", "cpu"):
                raise ValueError(f"device must be 'gpu' or 'cpu'; got {device!r}")
            if device == "gpu" and not mlx_gpu_available():
                raise BackendUnavailableError("MLX has no GPU here (install mlx-cuda-13 on "
                                              "Linux, or run on Apple silicon)")
            mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
        self.device = str(mx.default_device())

    def compile(self, f, fn, input_widths):
        seg = MlxSegment(f, fn, self.mx)
        seg(*[np.zeros((1, w), np.float32) for w in input_widths])  # convert the weights now
        self.mx.eval([w for w in seg.builder.weights.values() if not isinstance(w, tuple)]
                     + [a for w in seg.builder.weights.values() if isinstance(w, tuple)
                        for a in w[:3]])
        seg.freeze()
        return seg

    def to_host(self, a) -> np.ndarray:
        return np.asarray(a, np.float32) if isinstance(a, self.mx.array) else a

    def make_attention_core(self, f, cfg, layer):
        return MlxAttentionCore(f, cfg, layer, self)

    def make_kv_caches(self, spec, n_layers, n_kv_heads, head_dim, sliding_windows=None,
                       rope_shifts=None):
        if not device_cache_supports(spec):  # q8/q4/bounded caches stay on the host (numpy)
            return super().make_kv_caches(spec, n_layers, n_kv_heads, head_dim,
                                          sliding_windows, rope_shifts)
        windows = sliding_windows or [None] * n_layers
        return [MlxKVCache(n_kv_heads, head_dim, self.mx, window=windows[i])
                for i in range(n_layers)]
