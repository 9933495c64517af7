"""Every choice a user can make, with its default and its validation, in one place.

`fl.load`, `Model.stream`, the CLI's flags and the server read their defaults from these
dataclasses. Each field also names the keyword argument `fl.load(...)` takes for it
(`kv_cache=` is `KVOptions.kind`), so the flat keyword style and the dataclasses stay one set
of options: `LoadOptions.from_kwargs` maps one onto the other. A bad value raises
InvalidArgumentError naming the value, when the dataclass is made.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .cache.kv import KV_KINDS, KVSpec
from .errors import InvalidArgumentError
from .kernels.base import default_threads
from .memory import parse_budget
from .sampling import (
    LogitsProcessor,
    Sampler,
    make_repetition_penalty,
    make_sampler,
    validate_sampling,
)

__all__ = ["BACKENDS", "FFN_MODES", "FILTER_MODES", "KV_KINDS", "FilterOptions", "FlashOptions",
           "KVOptions", "LoadOptions", "RuntimeOptions", "SamplingOptions", "ServerOptions",
           "VocabOptions", "default_threads", "kwarg_names", "with_kwargs"]

BACKENDS = ("auto", "numpy", "onnxruntime", "mlx")
FFN_MODES = ("naive", "skip", "cache", "ours")  # flash/ffn.py's ablation modes
FILTER_MODES = ("gemfilter", "auto")


def _option(default, kwarg: str | None = None, **kw):
    """A field whose fl.load keyword is `kwarg` (default: the field's own name)."""
    return field(default=default, metadata={"kwarg": kwarg}, **kw)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _require(ok: bool, name: str, rule: str, value) -> None:
    if not ok:
        raise InvalidArgumentError(f"{name} must be {rule}; got {value!r}")


def _int_at_least(name: str, value, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    _require(_is_int(value) and value >= low, name,
             f"an integer >= {low}" + (" or None" if optional else ""), value)


def _fraction(name: str, value, low_open: bool, high_open: bool, optional=False) -> None:
    if optional and value is None:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and (
        (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1))
    rule = f"in {'(' if low_open else '['}0, 1{')' if high_open else ']'}"
    _require(ok, name, rule, value)


def kwarg_names(cls) -> dict[str, str]:
    """{fl.load keyword: field name} of an options dataclass."""
    return {(f.metadata.get("kwarg") or f.name): f.name for f in dataclasses.fields(cls)}


def with_kwargs(options, kwargs: dict):
    """options with the fields named by kwargs (fl.load keywords) replaced; the used keys are
    removed from kwargs. The new values are validated."""
    names = kwarg_names(type(options))
    given = {names[k]: kwargs.pop(k) for k in list(kwargs) if k in names}
    return dataclasses.replace(options, **given) if given else options


DEFAULT_CHUNK = 256
FLASH_BUDGET_CHUNK = 128


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how the model runs."""

    backend: str = "auto"
    threads: int | None = None  # None: the physical cores
    ctx_size: int | None = None  # None: the model's context length
    # prompt tokens per forward pass; None: DEFAULT_CHUNK, or FLASH_BUDGET_CHUNK for a model on
    # flash under a memory budget (a chunk's attention scores and FFN arrays scale with it)
    prefill_chunk: int | None = None
    # "300MB", "1.5GB", bytes, or a fraction of the model file; None: no budget
    memory_budget: str | int | float | None = None
    # progress(step, total, what) while a first load converts the model (None: a bar on stderr)
    progress: Callable[[int, int, str], None] | None = _option(None, compare=False)

    def __post_init__(self):
        _require(self.backend in BACKENDS, "backend", f"one of {', '.join(BACKENDS)}",
                 self.backend)
        _int_at_least("threads", self.threads, 1, optional=True)
        _int_at_least("ctx_size", self.ctx_size, 1, optional=True)
        _int_at_least("prefill_chunk", self.prefill_chunk, 1, optional=True)
        parse_budget(self.memory_budget, 1)  # its form only: fractions need the file's size

    @property
    def n_threads(self) -> int:
        return self.threads or default_threads()


@dataclass(frozen=True)
class KVOptions:
    """The KV cache: its kind, a bound (StreamingLLM sinks + a recent window), and the number
    of tokens a memory budget reserves room for."""

    kind: str = _option("f16", "kv_cache")  # "f16" | "f32" | "q8" | "q4"
    window: int | None = _option(None, "kv_window")  # None: unbounded
    sinks: int = _option(4, "kv_sinks")
    residual: int = _option(128, "kv_residual")  # q8/q4: recent positions kept in float16
    reserve_tokens: int = _option(1024, "kv_reserve_tokens")

    def __post_init__(self):
        self.spec  # noqa: B018  (KVSpec validates kind, window, sinks and residual)
        _int_at_least("kv_reserve_tokens", self.reserve_tokens, 1)

    @property
    def spec(self) -> KVSpec:
        return KVSpec(self.kind, self.window, self.sinks, self.residual)


@dataclass(frozen=True)
class FlashOptions:
    """FFN weights on flash: how much of them stays in DRAM, which neurons are computed, how
    they are read."""

    ffn_share: float | None = None  # fraction of neurons in DRAM; None: the planner's choice
    skip_fraction: float = 0.3  # calibrated share of predicted contribution skipped
    cold_skip_fraction: float | None = None  # higher bar for neurons not in DRAM (None: same)
    # bytes between two wanted ranges below which one read spans both; None: from the disk
    # probe's curve at the reader's depth where this machine was probed, else DEFAULT_GAP
    coalesce_gap: int | None = None
    mode: str = _option("ours", "ffn_mode")
    neuron_window: int = 5  # tokens whose neurons stay in the pool
    direct_io: bool = True  # O_DIRECT reads (FFN bundles and vocabulary rows)
    prefetch: bool = False  # read the next layers' bundles while a layer computes

    def __post_init__(self):
        _fraction("ffn_share", self.ffn_share, low_open=True, high_open=False, optional=True)
        _fraction("skip_fraction", self.skip_fraction, low_open=False, high_open=True)
        _fraction("cold_skip_fraction", self.cold_skip_fraction, low_open=False,
                  high_open=True, optional=True)
        _int_at_least("coalesce_gap", self.coalesce_gap, 0, optional=True)
        _require(self.mode in FFN_MODES, "ffn_mode", f"one of {', '.join(FFN_MODES)}",
                 self.mode)
        _int_at_least("neuron_window", self.neuron_window, 0)


@dataclass(frozen=True)
class VocabOptions:
    """The vocabulary on flash: a low-bit preview head picks candidates, their exact rows are
    read on demand."""

    on_flash: bool | None = _option(None, "vocab_on_flash")  # None: when the budget needs it
    head_candidates: int = 64
    hot_rows: int = _option(1024, "vocab_hot_rows")  # rows of frequent tokens kept resident
    cache_rows: int = _option(4096, "vocab_cache_rows")  # recently read rows kept

    def __post_init__(self):
        _int_at_least("head_candidates", self.head_candidates, 1)
        _int_at_least("vocab_hot_rows", self.hot_rows, 0)
        _int_at_least("vocab_cache_rows", self.cache_rows, 0)


DEFAULT_KEEP = 1024
# token_filter="auto" applies from this many prompt tokens on (chosen from
# benchmarks/results/gemfilter_gemma3-270m.json: see benchmarks/README.md, GemFilter on the CPU).
DEFAULT_THRESHOLD = 4096


@dataclass(frozen=True)
class FilterOptions:
    """The prompt token filter (filter/gemfilter.py): mode None | "gemfilter" | "auto", the
    tokens to keep, the filter layer (None: the model's default) and auto's threshold."""

    mode: str | None = _option(None, "token_filter")
    keep: int = _option(DEFAULT_KEEP, "filter_keep")
    layer: int | None = _option(None, "filter_layer")
    threshold: int = _option(DEFAULT_THRESHOLD, "filter_threshold")

    def __post_init__(self):
        if self.mode is not None and self.mode not in FILTER_MODES:
            raise InvalidArgumentError(
                f"token_filter must be None, 'gemfilter' or 'auto'; got {self.mode!r}")
        _int_at_least("filter_keep", self.keep, 1)
        _int_at_least("filter_threshold", self.threshold, 1)
        _int_at_least("filter_layer", self.layer, 0, optional=True)

    def applies(self, n_tokens: int, fits_unfiltered: bool = True) -> bool:
        """Whether a prompt of n_tokens is filtered: never when it fits in `keep` anyway;
        "auto" from `threshold` tokens on (where the filter saves time), or sooner when the
        unfiltered prompt would not fit the memory budget (fits_unfiltered=False)."""
        if self.mode is None or n_tokens <= self.keep:
            return False
        return self.mode == "gemfilter" or n_tokens >= self.threshold or not fits_unfiltered


@dataclass(frozen=True)
class SamplingOptions:
    """Model.stream's sampling defaults (llama.cpp's chain: top-k, top-p, min-p, temperature;
    greedy at temperature 0)."""

    temperature: float = 0.0
    top_k: int = 40  # 0: off
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self):
        validate_sampling(self.temperature, self.top_k, self.top_p, self.min_p,
                          self.repeat_penalty, self.repeat_last_n)

    def sampler(self) -> Sampler:
        return make_sampler(self.temperature, self.top_k, self.top_p, self.min_p, self.seed)

    def processors(self) -> list[LogitsProcessor]:
        penalty = make_repetition_penalty(self.repeat_penalty, self.repeat_last_n)
        return [penalty] if penalty else []


@dataclass(frozen=True)
class ServerOptions:
    """The HTTP server's queue and the conversation caches it keeps between requests."""

    cache_slots: int = 4  # conversations whose KV cache is kept for their next turn
    max_queue: int = 64  # requests waiting beyond this get 503
    cache_bytes: int | None = 256 * 2**20  # most memory the kept caches hold (None: no bound)

    def __post_init__(self):
        _int_at_least("cache_slots", self.cache_slots, 0)
        _int_at_least("max_queue", self.max_queue, 1)
        _int_at_least("cache_bytes", self.cache_bytes, 0, optional=True)


GROUPS = {"runtime": RuntimeOptions, "kv": KVOptions, "flash": FlashOptions,
          "vocab": VocabOptions, "filter": FilterOptions}


@dataclass(frozen=True)
class LoadOptions:
    """Everything fl.load takes besides the model."""

    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    kv: KVOptions = field(default_factory=KVOptions)
    flash: FlashOptions = field(default_factory=FlashOptions)
    vocab: VocabOptions = field(default_factory=VocabOptions)
    filter: FilterOptions = field(default_factory=FilterOptions)

    @classmethod
    def from_kwargs(cls, **kwargs) -> LoadOptions:
        """From fl.load's keywords: option dataclasses (runtime=, kv=, flash=, vocab=,
        filter=) and/or flat keywords (kv_cache="q8", ffn_share=0.5, ...), which override the
        dataclasses' fields."""
        groups = {}
        for name, kind in GROUPS.items():
            given = kwargs.pop(name, None)
            if given is not None and not isinstance(given, kind):
                raise InvalidArgumentError(f"{name}= takes a {kind.__name__}; got {given!r}")
            groups[name] = with_kwargs(given or kind(), kwargs)
        if kwargs:
            raise InvalidArgumentError(f"unknown load option {sorted(kwargs)[0]!r}")
        return cls(**groups)
