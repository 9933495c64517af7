"""The reference backend: weights dequantized to float32 by `gguf`, matmuls by numpy (BLAS).

Simple and exact, and about 7x the memory of a 4-bit file: it is the yardstick the compact
backends are tested against, not the default.
"""

from __future__ import annotations

import numpy as np

from .base import Backend, GraphBuilder, Segment
from .ops import ACTIVATIONS, rms_norm


class _Eager(GraphBuilder):
    """Runs each op at once on arrays; weights are dequantized on first use and kept."""

    def __init__(self, f):
        self.f = f
        self.weights: dict[str, np.ndarray] = {}

    def _w(self, name, transpose=False):
        if name not in self.weights:
            w = self.f.dense(name)
            self.weights[name] = np.ascontiguousarray(w.T) if transpose else w
        return self.weights[name]

    def linear(self, x, weight, bias=None, rows=None):
        if rows is None:
            w = self._w(weight, transpose=True)  # stored (K, N)
        else:  # a head slice: its rows only (each slice holding the whole table is 21 GB)
            key = f"{weight}[{rows[0]}:{rows[1]}]"
            if key not in self.weights:
                part = self.f.rows(weight, np.arange(rows[0], rows[1]))  # (rows, K)
                self.weights[key] = np.ascontiguousarray(part.T)  # (K, rows)
            w = self.weights[key]
        y = x @ w
        return y if bias is None else y + self._w(bias)

    def linear_packed(self, x, grid):
        key = f"packed:{id(grid)}"
        if key not in self.weights:
            self.weights[key] = np.ascontiguousarray(grid.dequantize().T)  # (K, N)
        return x @ self.weights[key]

    def rms_norm(self, x, weight, eps):
        return rms_norm(x, self._w(weight), eps)

    def add(self, a, b):
        return a + b

    def mul(self, a, b):
        return a * b

    def activation(self, x, kind):
        return ACTIVATIONS[kind](x)


class NumpySegment(Segment):
    def __init__(self, f, fn):
        self.builder, self.fn = _Eager(f), fn

    def __call__(self, *inputs):
        return list(self.fn(self.builder, *inputs))

    @property
    def nbytes(self):
        return sum(w.nbytes for w in self.builder.weights.values())


class NumpyBackend(Backend):
    name = "numpy"

    def compile(self, f, fn, input_widths):
        seg = NumpySegment(f, fn)
        seg(*[np.zeros((1, w), np.float32) for w in input_widths])  # load weights now
        return seg
