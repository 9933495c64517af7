"""The one exception family of the public API.

Every mistake a user can make (a missing file, a file that is not a GGUF, an unsupported
architecture or quant type, a prompt past the context, a bad sampling argument) raises a
subclass of `FlashInferError`, so an application can catch one type and the CLI can print
one line.
"""

from __future__ import annotations


class FlashInferError(Exception):
    """Base class of every error flashinfer-lite raises on purpose."""


class ModelNotFoundError(FlashInferError, FileNotFoundError):
    """The model path does not exist, or a short name's package is not installed."""


class InvalidModelFileError(FlashInferError, ValueError):
    """The file is not a GGUF, is truncated, or its header contradicts itself."""


class UnsupportedModelError(FlashInferError, NotImplementedError):
    """A well-formed GGUF that uses an architecture or quant type we do not run."""


class ContextLengthError(FlashInferError, ValueError):
    """A prompt (plus the tokens to generate) does not fit the context window."""


class InvalidArgumentError(FlashInferError, ValueError):
    """A bad argument to the API: a negative temperature, an unknown backend, ..."""


class BackendUnavailableError(FlashInferError, RuntimeError):
    """The requested compute backend is not installed or has no usable device."""


class BudgetError(FlashInferError, ValueError):
    """The memory budget cannot hold the model's minimum; the message states the minimum."""


class KVBudgetError(ContextLengthError):
    """The KV cache of a context would not fit the memory budget (the message says how much)."""


class CacheFileError(FlashInferError, ValueError):
    """A saved prompt cache is damaged, truncated, or was made by another model or cache kind."""
