"""The public Model: load once, then tokenize / logits / generate / stream / chat.

A facade over named parts: what loading.py built (network, heads, FFN and vocabulary on
flash), a PromptCache whose longest common prefix with each call's prompt is reused (a chat
turn only prefills the new turn; a server swaps in one per conversation), the generation loop
(generate.py), the token filter (filter/gemfilter.py) and the chat format (chat.py).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .cache.persist import model_identity
from .chat import ChatFormat
from .errors import InvalidArgumentError
from .filter.budget import PromptBudget, PromptMemory
from .filter.gemfilter import FilterResult, GemFilter, resolve_layer
from .generate import (
    Cancelled,
    GenerationChunk,
    GenerationStats,
    Runner,
    check_ids,
    stream_generate,
)
from .loading import load_model
from .options import DEFAULT_KEEP, FilterOptions, LoadOptions, SamplingOptions, with_kwargs
from .planning import ContextLimits
from .prompt_cache import PromptCache, make_layer_caches
from .registry import resolve_model
from .speculative import DraftOptions
from .tokenizer import SegmentedEncoder

SAMPLING, DRAFT = SamplingOptions(), DraftOptions()


class Model:
    """A loaded model. A lock serializes calls (threads may share one); a stream holds it."""

    def __init__(self, path: Path, options: LoadOptions | None = None, **kwargs):
        """options and/or fl.load's keywords (options.py): the keywords win."""
        self.options = LoadOptions.from_kwargs(**{**vars(options or LoadOptions()), **kwargs})
        kv = self.options.kv
        self._parts = parts = load_model(path, self.options)
        self.path, self.config, self.tokenizer = parts.path, parts.config, parts.tokenizer
        self.backend, self.threads = parts.backend, parts.threads
        self.n_ctx, self.memory_budget, self.plan = parts.n_ctx, parts.memory_budget, parts.plan
        self.resident_rss_bytes, self.load_s = parts.resident_rss_bytes, parts.load_s
        self.filter_options = self.options.filter
        resolve_layer(self.filter_options, self.config)  # a bad filter_layer fails at load
        self.prefill_chunk, self.kv_spec, self.kv_cache = parts.prefill_chunk, kv.spec, kv.kind
        self.limits = ContextLimits(self.n_ctx, self.kv_spec.bounded, kv.kind,
                                    self.prefill_chunk, self.memory_budget, parts.held_bytes)
        self.runner = Runner(parts.net, parts.head, self.prefill_chunk, self.limits)
        self.prompt_budget = PromptBudget(self.config, self._make_caches, self.kv_spec,
                                          self.prefill_chunk, self.limits,
                                          pools_from_budget=self.plan is not None)
        self.prompt_cache = self.make_prompt_cache()
        self._chat = ChatFormat(parts.file, self.config.architecture, self.config.vocab_size,
                                self.tokenizer)
        self.chat_template = self._chat.template
        self._lock = threading.RLock()
        self._streaming = False  # an RLock lets one thread re-enter: refuse a second open stream
        self.generation_stats: GenerationStats | None = None  # the last call's
        self._load_stats = {"load_s": self.load_s, **self.memory_report()}

    # ---- parts and memory ----------------------------------------------------------------------
    # The parts loading.py built: the network (models/common.py's CausalLM; None once closed),
    # the FFN on flash (flash/ffn.py's FlashFFN) and the two-stage head (vocab/head.py), each
    # None when not used; their reads, and the memory they hold as loading.py counts it.
    net = property(lambda self: self._parts.net)
    flash = property(lambda self: self._parts.flash)
    vocab_head = property(lambda self: self._parts.vocab_head)
    vocab_bytes = property(lambda self: self._parts.vocab_bytes)
    resident_bytes = property(lambda self: self._parts.resident_bytes)
    held_bytes = property(lambda self: self._parts.held_bytes)

    def flash_report(self) -> dict:
        return self._parts.flash_report()

    @property
    def stats(self) -> dict:
        """The last call's stats as a dict (GenerationStats.as_dict); the load's before."""
        s = self.generation_stats
        return s.as_dict() if s is not None else dict(self._load_stats)

    kv_bytes = property(lambda self: self.prompt_cache.nbytes)

    def memory_report(self) -> dict:
        return {"resident_bytes": self.resident_bytes, "kv_bytes": self.kv_bytes,
                "file_bytes": self._parts.file.file_size}

    # every layer's cache is bounded: a context may then run past n_ctx
    bounded = property(lambda self: self.kv_spec.bounded)

    def kv_bytes_needed(self, n_tokens: int) -> int:
        """Bytes the KV cache holds after n_tokens positions (a bounded cache levels off)."""
        return self.prompt_cache.bytes_at(n_tokens, self.prefill_chunk)

    def kv_budget_bytes(self) -> int | None:
        """What memory_budget leaves for the KV cache (None: no budget given)."""
        return self.limits.kv_budget_bytes

    # ---- the prompt cache --------------------------------------------------------------------
    def make_prompt_cache(self) -> PromptCache:
        """An empty prompt cache for this model (mlx-lm's make_prompt_cache)."""
        return PromptCache([], self._make_caches(self.kv_spec), id(self))

    def _make_caches(self, spec) -> list:
        return make_layer_caches(self._parts.net, spec)

    def prompt_memory(self, prompt: str | Sequence[int], **filter_overrides) -> PromptMemory:
        """What running prompt would hold beyond the loaded model (its KV cache, GemFilter's
        pass 1 when it would be filtered, activations), as the budget check counts it;
        filter_overrides as stream's. `prompt_budget.fits(...)` says whether it fits."""
        ids = self._check_ids(self.tokenize(prompt) if isinstance(prompt, str) else prompt)
        options = self._filter_options(filter_overrides)
        with self._lock:
            return self.prompt_budget.plan(len(ids), options, resolve_layer(options, self.config),
                                           self.prompt_cache.nbytes)

    def reset(self) -> None:
        """Forget the KV cache (the next call prefills from scratch)."""
        with self._lock:
            self.prompt_cache = self.make_prompt_cache()

    def swap_cache(self, state: PromptCache | None = None) -> PromptCache:
        """Take the prompt cache out of the model and put state in its place (None: an empty
        cache). A server keeps one per conversation, so interleaved conversations each reuse
        their own prefix; a state's memory is its nbytes."""
        with self._lock:
            self._refuse_nested("swap_cache")
            if state is not None and state.owner != id(self):
                raise InvalidArgumentError("this KVState belongs to another Model")
            old = self.prompt_cache
            self.prompt_cache = state if state is not None else self.make_prompt_cache()
            return old

    def save_cache(self, path) -> None:
        """Write the prompt cache to path (atomically), with the model's identity and a checksum."""
        with self._lock:
            self.prompt_cache.save(path, self._identity, self.kv_spec)

    def load_cache(self, path) -> int:
        """Replace the prompt cache with one saved by save_cache; returns the positions it
        holds. A file from another model or cache kind, or a damaged one: CacheFileError."""
        with self._lock:
            empty = self.make_prompt_cache()
            self.prompt_cache = PromptCache.load(path, self._identity, self.kv_spec,
                                                 empty.caches, id(self))
            return len(self.prompt_cache.ids)

    @functools.cached_property
    def _identity(self) -> dict:  # hashes the GGUF's metadata: once
        return model_identity(self._parts.file, self.config)

    def _refuse_nested(self, what: str) -> None:
        if self._streaming:
            raise InvalidArgumentError(
                f"{what}: a stream on this model is still open in this thread; finish it or "
                "close() it first")

    def close(self) -> None:
        with self._lock:
            self._parts.close()
            self.prompt_cache = PromptCache([], [], id(self))
            self.prompt_budget.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- text <-> ids, logits ----------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def _check_ids(self, ids) -> list[int]:
        if self.net is None:
            raise InvalidArgumentError("this model is closed; load it again")
        return check_ids(ids, self.config.vocab_size, self.limits)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), vocab) float32 logits through the prompt path (chunked, with the cache)."""
        return self._run_fresh(ids, "all")

    def hidden_states(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), d_model) final-normed hidden states (what the head multiplies)."""
        return self._run_fresh(ids, "hidden")

    def _run_fresh(self, ids, out: str) -> np.ndarray:
        ids = self._check_ids(ids)
        with self._lock:
            self.reset()
            return self.runner(self.prompt_cache, ids, out)

    # ---- token filter (GemFilter) ------------------------------------------------------------
    @property
    def control_tokens(self) -> np.ndarray:
        """(vocab,) bool: the vocabulary's control tokens (<bos>, <start_of_turn>, ...)."""
        return self._chat.control_tokens

    @functools.cached_property
    def gemfilter(self) -> GemFilter:
        """The GemFilter of this model (built on first use: it reads the token types)."""
        return GemFilter(self.net, self.kv_spec, self.control_tokens, self.tokenizer.token_text,
                         self.prefill_chunk)

    def filter_prompt(self, ids: Sequence[int], keep: int = DEFAULT_KEEP,
                      layer: int | None = None) -> FilterResult:
        """GemFilter's pass 1 and selection alone: which of ids a filtered call would keep."""
        layer = resolve_layer(FilterOptions("gemfilter", keep, layer), self.config)
        with self._lock:
            return self.gemfilter(list(ids), keep, layer)

    # ---- generation ------------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], max_tokens: int = 256,
               temperature: float = SAMPLING.temperature, top_k: int = SAMPLING.top_k,
               top_p: float = SAMPLING.top_p, min_p: float = SAMPLING.min_p,
               repeat_penalty: float = SAMPLING.repeat_penalty,
               repeat_last_n: int = SAMPLING.repeat_last_n, seed: int | None = None,
               stop: str | Sequence[str] | None = None, cancel: threading.Event | None = None,
               num_draft_tokens: int = DRAFT.num_draft,
               **filter_overrides) -> Iterator[GenerationChunk]:
        """Yield GenerationChunk(text, token, stats) as tokens are generated.

        prompt: text (tokenized with BOS, special tokens parsed) or token ids. Generation ends at
        an end-of-generation token, a stop string (not included), max_tokens, or the context end.
        cancel: an event another thread may set; the stream then stops within one token (or one
        prefill chunk), frees the KV cache and ends with a "cancelled" chunk.
        num_draft_tokens: speculative decoding's draft length (speculative.py); 0: off.
        filter_overrides: token_filter, filter_keep, filter_layer, filter_threshold (FilterOptions)
        for this call (default: what load() was given)."""
        options = self._filter_options(filter_overrides)
        s = SamplingOptions(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                            seed)  # validates
        if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
            raise InvalidArgumentError(f"max_tokens must be an integer >= 0; got {max_tokens!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        ids = self._check_ids(self.tokenize(prompt) if isinstance(prompt, str) else prompt)
        draft = DraftOptions(num_draft_tokens)  # validates
        return self._stream(ids, max_tokens, s.sampler(), s.processors(), stops, cancel,
                            options, draft)

    def _stream(self, ids, max_tokens, sampler, processors, stops, cancel, options, draft):
        with self._lock:
            self._refuse_nested("stream")
            self._streaming = True
            stats = GenerationStats(self.backend.name, len(ids),
                                    resident_bytes=self.resident_bytes)
            try:
                layer = resolve_layer(options, self.config)
                mem = self.prompt_budget.plan(len(ids), options, layer, self.prompt_cache.nbytes)
                self.prompt_budget.check(mem, options, layer)  # before anything runs
                stats.prompt_memory = mem
                if mem.filtered:
                    stats.filtered = self.filter_prompt(ids, options.keep, layer)
                    ids = stats.filtered.kept_ids  # pass 2 runs these from position 0
                reused = self.prompt_cache.reuse(ids)
                if reused is None:  # a bounded cache had dropped positions it would need
                    self.prompt_cache, reused = self.make_prompt_cache(), 0
                stats.prompt_tokens_reused = reused
                if self.flash is not None:
                    self.flash.reset_counters()
                self.generation_stats = stats
                yield from stream_generate(self.runner, self.tokenizer, self.prompt_cache,
                                           ids, max_tokens, sampler, processors, stops, stats,
                                           self.flash_report, cancel, draft)
            except Cancelled:
                # the caller gave up: drop its cache now rather than hold it until the next call
                self.prompt_cache, stats.cancelled = self.make_prompt_cache(), True
                yield GenerationChunk("", None, stats.as_dict(), "cancelled")
            finally:
                self._streaming = False

    def _filter_options(self, overrides: dict) -> FilterOptions:
        """The load's filter options with a call's overrides (validated; the layer too)."""
        options = with_kwargs(self.filter_options, overrides)
        if overrides:
            raise InvalidArgumentError(f"unknown generation option {sorted(overrides)[0]!r}")
        resolve_layer(options, self.config)
        return options

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, **kw) -> str:
        return "".join(c.text for c in self.stream(prompt, max_tokens=max_tokens, **kw))

    # ---- chat ----------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        """Whether the GGUF carries a chat template (or the architecture has a known one)."""
        return self._chat.native

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return self._chat.encode(messages, add_generation_prompt)

    @property
    def chat_encoder(self) -> SegmentedEncoder:
        """Tokenizes rendered chats a piece between special tokens at a time."""
        return self._chat.encoder

    def stream_chat(self, messages, **kw) -> Iterator[GenerationChunk]:
        return self.stream(self.apply_chat_template(messages), **kw)

    def chat(self, messages, **kw) -> str:
        return "".join(c.text for c in self.stream_chat(messages, **kw))


def load(model=None, **options) -> Model:
    """Load a model: None (the bundled default), a short name, or a .gguf path.

    options: the option dataclasses (runtime=RuntimeOptions(...), kv=KVOptions(...), flash=,
    vocab=, filter=) and/or their fields as flat keywords, which options.py lists with their
    defaults: memory_budget="300MB", backend="onnxruntime", kv_cache="q8", token_filter="auto",
    ffn_share=0.5, ... progress(step, total, what) is called while a first load converts the
    model to the flash format (None: a bar on stderr); raising in it stops the conversion."""
    return Model(resolve_model(model), **options)

