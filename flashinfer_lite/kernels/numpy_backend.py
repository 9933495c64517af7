"""The reference backend: weights dequantized to float32 by `gguf`, matmuls by numpy (BLAS).

Simple and exact, and about 7x the memory of a 4-bit file: it is the yardstick the compact
backends are tested against, not the default.
"""

from __future__ import annotations

import numpy as np

from .base import Backend, FeedForward, Linear
from .ops import ACTIVATIONS


class DenseLinear(Linear):
    def __init__(self, weights: list[np.ndarray], biases):
        self.weights_t = [np.ascontiguousarray(w.T) for w in weights]  # (K, N) each
        self.biases = biases

    def __call__(self, x):
        out = []
        for w, b in zip(self.weights_t, self.biases, strict=True):
            y = x @ w
            out.append(y if b is None else y + b)
        return out

    @property
    def nbytes(self):
        return sum(w.nbytes for w in self.weights_t)


class DenseFeedForward(FeedForward):
    def __init__(self, gate, up, down, activation):
        self.gate_up = DenseLinear([gate, up], [None, None])
        self.down = DenseLinear([down], [None])
        self.act = ACTIVATIONS[activation]

    def __call__(self, x):
        g, u = self.gate_up(x)
        return self.down(self.act(g) * u)[0]

    @property
    def nbytes(self):
        return self.gate_up.nbytes + self.down.nbytes


class NumpyBackend(Backend):
    name = "numpy"

    def linear(self, f, names, biases=None):
        biases = list(biases) if biases is not None else [None] * len(names)
        return DenseLinear([f.dense(n) for n in names], biases)

    def feed_forward(self, f, gate, up, down, activation):
        return DenseFeedForward(f.dense(gate), f.dense(up), f.dense(down), activation)
