"""The MLX backend: the same segments (kernels/base.py) on an Apple GPU (mlx-metal), an NVIDIA GPU
(mlx-cuda) or MLX's CPU device, with GGUF weights kept quantized as MLX affine groups
(kernels/mlx_weights.py says how each GGUF type maps).

Activations stay float32. Segments are lazy MLX graphs: nothing runs until a result is read on
the host, so with the attention core and KV cache on the device too (kernels/mlx_attention.py)
one decode step is one synchronization, at the logits; greedy decoding is pipelined
(kernels/mlx_decode.py), so the host builds the next step while the device runs this one.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import sys
import weakref
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError
from ..loaders.packed_grid import unpack
from .base import Backend, GraphBuilder, Segment
from .mlx_attention import MlxAttentionCore, MlxKVCache, device_cache_supports
from .mlx_decode import GreedyPipeline
from .mlx_weights import GROUP, MlxQuantized, to_mlx_weight

# The CUDA libraries libmlx.so of mlx-cuda-13 0.32 needs, dependencies first. Its RPATH looks
# for them in ../../nvidia/*/lib beside mlx, where pip puts the nvidia-* wheels it pulls in.
_CUDA_LIBRARIES = ("libcudart.so.13", "libnvrtc.so.13", "libcublasLt.so.13", "libcublas.so.13",
                   "libnvJitLink.so.13", "libcusparse.so.12", "libcusolver.so.12",
                   "libcufft.so.12", "libnccl.so.2", "libcudnn.so.9")


def mlx_installed() -> bool:
    return importlib.util.find_spec("mlx") is not None


def load_cuda_libraries() -> list[str]:
    """Load mlx-cuda's CUDA libraries from the interpreter's nvidia-* wheels when mlx sits
    elsewhere (`pip install --target DIR` on a machine whose Python already has the CUDA
    wheels): libmlx.so's RPATH then finds none of them, and the dynamic loader reuses a
    library already loaded under the same name. Returns the paths loaded (none where the
    RPATH works, off Linux, or without mlx-cuda-13)."""
    spec = importlib.util.find_spec("mlx")
    if sys.platform != "linux" or spec is None or not spec.submodule_search_locations:
        return []
    try:
        importlib.metadata.distribution("mlx-cuda-13")
    except importlib.metadata.PackageNotFoundError:
        return []
    beside = Path(next(iter(spec.submodule_search_locations))).parent / "nvidia"
    if beside.is_dir():
        return []
    dirs = [d for p in sys.path if p and (Path(p) / "nvidia").is_dir()
            for d in sorted((Path(p) / "nvidia").glob("*/lib"))]
    loaded = []
    for name in _CUDA_LIBRARIES:
        path = next((d / name for d in dirs if (d / name).exists()), None)
        if path is not None:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            loaded.append(str(path))
    return loaded


def mlx_gpu_available() -> bool:
    """True when MLX is installed and its GPU (Metal or CUDA) backend works here."""
    if not mlx_installed():
        return False
    try:
        load_cuda_libraries()
        import mlx.core as mx  # optional: the [mlx] / [cuda] extras

        return bool(mx.is_available(mx.gpu))
    except Exception:  # a CPU-only build, or a GPU build without a driver
        return False


def _mx():
    try:
        load_cuda_libraries()
        import mlx.core as mx  # optional: the [mlx] / [cuda] extras
    except ImportError as exc:
        raise BackendUnavailableError(
            "the MLX backend needs mlx: pip install 'flashinfer-lite[mlx]' (macOS) or "
            "'flashinfer-lite[cuda]' (Linux with an NVIDIA GPU)") from exc
    return mx


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
        self._pipelines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

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

    def greedy_pipeline(self, net, caches):
        """One GreedyPipeline per network (its device embedding is built on first use)."""
        if not GreedyPipeline.supports(net, caches):
            return None
        if net not in self._pipelines:
            self._pipelines[net] = GreedyPipeline(net, self.mx)
        return self._pipelines[net]

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
