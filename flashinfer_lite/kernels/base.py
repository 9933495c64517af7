"""The seam between a model definition and the code that multiplies by its weights.

A model file (models/llama.py, models/gemma3.py) is written once against this interface; each
backend decides how weights are held (quantized for ONNX Runtime, float32 for the numpy reference)
and how the matmuls run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from ..loaders.gguf_file import GGUFFile


class Linear(ABC):
    """y_i = x @ W_i.T (+ b_i) for one or more weights sharing the input x (T, K)."""

    @abstractmethod
    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        """x (T, K) float32 -> one (T, N_i) float32 array per weight."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes this backend holds for the weights."""


class FeedForward(ABC):
    """down(act(gate(x)) * up(x)), x (T, d) -> (T, d)."""

    @abstractmethod
    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    @property
    @abstractmethod
    def nbytes(self) -> int: ...


class Backend(ABC):
    name: str

    @abstractmethod
    def linear(self, f: GGUFFile, names: Sequence[str],
               biases: Sequence[np.ndarray | None] | None = None) -> Linear: ...

    @abstractmethod
    def feed_forward(self, f: GGUFFile, gate: str, up: str, down: str,
                     activation: str) -> FeedForward: ...
