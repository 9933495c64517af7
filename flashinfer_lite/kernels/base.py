"""The seam between a model definition and the code that multiplies by its weights.

A model (models/llama.py, models/gemma3.py) describes each stretch of dense work between two
attention cores (o-projection, norms, FFN, residuals, the next layer's q/k/v projections) as a
function over a `GraphBuilder`. A backend `compile`s that function once into a `Segment`:

- the numpy reference backend runs it eagerly on float32 weights;
- the ONNX Runtime backend traces it into one ONNX graph with quantized weights, so a whole
  segment is one session call (per-call overhead, ~20 us, dominates a 576-wide matvec otherwise).

The attention core itself (RoPE, KV cache, softmax; kernels/attention.py) stays in numpy,
shared by all CPU backends; a device backend (kernels/mlx_backend.py) supplies its own core and
caches through `make_attention_core` / `make_kv_caches`, so activations stay on the device
between segments.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
import psutil

from ..cache.base import KVCache
from ..cache.kv import make_kv_caches
from ..cache.quantized import QuantizedView
from ..loaders.gguf_file import GGUFFile
from .ops import attention
from .quant_attention import quantized_decode


def default_threads() -> int:
    """Compute threads of a CPU backend: the physical cores."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class GraphBuilder(ABC):
    """Operations a segment may use. Values are opaque handles (arrays, or graph names)."""

    @abstractmethod
    def linear(self, x, weight: str, bias: str | None = None,
               rows: tuple[int, int] | None = None):
        """x (T, K) @ W.T (+ b): W is the GGUF tensor `weight` (N, K), or its rows
        [start, stop) when `rows` is given (the output head is compiled in slices)."""

    def linear_packed(self, x, grid):
        """x (T, K) @ W.T for W a loaders/packed_grid.PackedGrid (N, K) held outside any GGUF (the
        preview head). Backends that cannot run it raise NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} has no packed low-bit matmul")

    @abstractmethod
    def rms_norm(self, x, weight: str, eps: float): ...

    @abstractmethod
    def add(self, a, b): ...

    @abstractmethod
    def mul(self, a, b): ...

    @abstractmethod
    def activation(self, x, kind: str):
        """kind: "silu" | "gelu_tanh"."""


SegmentFn = Callable[..., Sequence]  # (builder, *inputs) -> outputs


class Segment(ABC):
    """A compiled segment: (T, width) float32 arrays in, a list of float32 arrays out."""

    @abstractmethod
    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]: ...

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held for this segment's weights."""


class Backend(ABC):
    name: str

    def attention(self, q, k, v, q_pos, k_pos, scale, window=None) -> np.ndarray:
        """Causal GQA; see kernels/ops.attention for shapes. Backends may override."""
        return attention(q, k, v, q_pos, k_pos, scale, window)

    def few_query_attention(self, q, k, v, q_pos, k_pos, scale, window=None):
        """A few queries (a chat turn's new tokens) over a whole cache in one call: k, v
        (S, Hkv, D) float16 or float32 as held, positions k_pos; (T, H * D) float32. None when
        this backend has no such kernel or the scores would be too large: the caller then
        goes block by block (kernels/prefill_attention)."""
        return None

    def takes_few_queries(self, t: int, n_heads: int, s: int) -> bool:
        """Whether few_query_attention would take T queries of n_heads over S positions."""
        return False

    def quantized_decode_attention(self, q, view: QuantizedView, scale) -> np.ndarray:
        """One query (1, H, D) over every position of a QuantizedView (cache/quantized.py), no
        mask; (1, H * D). A numba kernel on the codes (kernels/quant_attention.py: at 4096
        positions as fast as ORT's float16 kernel, where dequantizing in ORT or numpy was 2-3x
        slower)."""
        return quantized_decode(q, view, scale)

    def make_attention_core(self, f: GGUFFile, cfg, layer: int):
        """The attention core of a layer, or None for the shared numpy one
        (kernels/attention.py).
        A device backend returns its own, so q/k/v and the cache stay on the device."""
        return None

    def make_kv_caches(self, spec, n_layers: int, n_kv_heads: int, head_dim: int,
                       sliding_windows=None, rope_shifts=None) -> list[KVCache]:
        """One KV cache per layer (cache/kv.py); a device backend may keep them on the device."""
        return make_kv_caches(spec, n_layers, n_kv_heads, head_dim, sliding_windows,
                              rope_shifts)

    def to_host(self, a) -> np.ndarray:
        """A segment's output as a numpy array (device backends copy it back)."""
        return a

    def greedy_pipeline(self, net, caches):
        """An object whose `tokens(first, cache, room, check)` yields greedy tokens with the
        next step queued before the host reads this one (kernels/mlx_decode.py), for net over
        these caches; None where the backend has none (the host samples every step)."""
        return None

    def warm(self) -> None:  # noqa: B027  (optional hook: most backends have nothing to set up)
        """Set up the backend's process-wide state (runtime, not model memory)."""

    @abstractmethod
    def compile(self, f: GGUFFile, fn: SegmentFn, input_widths: Sequence[int]) -> Segment:
        """Build a Segment computing fn(builder, *inputs) for inputs of the given widths."""
