"""flashinfer-lite: run GGUF language models on memory-constrained personal devices.

    import flashinfer_lite as fl
    m = fl.load()                       # the bundled SmolLM2-135M-Instruct
    print(m.generate("The capital of France is", max_tokens=16))
"""

from .errors import (
    BackendUnavailableError,
    BudgetError,
    CacheFileError,
    ContextLengthError,
    FlashInferError,
    InvalidArgumentError,
    InvalidModelFileError,
    KVBudgetError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from .generate import GenerationChunk
from .model import KVState, Model, load

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "BudgetError", "CacheFileError", "ContextLengthError",
    "FlashInferError", "GenerationChunk", "InvalidArgumentError", "InvalidModelFileError",
    "KVBudgetError", "KVState", "Model",
    "ModelNotFoundError", "UnsupportedModelError", "load", "__version__",
]
