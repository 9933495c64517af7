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
from .generate import GenerationChunk, GenerationStats
from .model import Model, load
from .options import (
    FilterOptions,
    FlashOptions,
    KVOptions,
    LoadOptions,
    RuntimeOptions,
    SamplingOptions,
    VocabOptions,
)
from .prompt_cache import KVState, PromptCache

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "BudgetError", "CacheFileError", "ContextLengthError",
    "FilterOptions", "FlashInferError", "FlashOptions", "GenerationChunk", "GenerationStats",
    "InvalidArgumentError", "InvalidModelFileError", "KVBudgetError", "KVOptions", "KVState",
    "LoadOptions", "Model", "ModelNotFoundError", "PromptCache", "RuntimeOptions",
    "SamplingOptions", "UnsupportedModelError", "VocabOptions", "load", "__version__",
]
