"""The public Model: load once, then tokenize / logits / generate / stream / chat.

A Model keeps one KV cache and the ids it holds; every call reuses the longest common prefix with
the previous call, so a chat turn only prefills the new turn. An app serving several conversations
keeps one KVState per conversation and swaps it in with swap_cache.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache.kv import KVSpec
from .chat_template import ChatTemplate
from .config import ModelConfig
from .errors import ContextLengthError, InvalidArgumentError, KVBudgetError
from .filter.gemfilter import (
    CONTROL_TOKEN,
    DEFAULT_KEEP,
    DEFAULT_THRESHOLD,
    FilterOptions,
    FilterResult,
    GemFilter,
    resolve_layer,
)
from .flash.planner import WORKING_BYTES
from .generate import GenerationChunk, StopMatcher, generate_step
from .kernels.base import Backend
from .loaders.flash_format import is_flash_dir, open_flash_dir
from .loaders.gguf_file import GGUFFile
from .memory import (
    limit_heap_retention,
    parse_budget,
    peak_rss_bytes,
    release_freed_memory,
    release_mapped_pages,
    rss_bytes,
)
from .models import build_model
from .registry import resolve_model
from .sampling import make_repetition_penalty, make_sampler, validate_sampling
from .tokenizer import SegmentedEncoder, Tokenizer

BACKENDS = ("auto", "numpy", "onnxruntime", "mlx")


def default_threads() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def make_backend(name: str, threads: int) -> Backend:
    if name not in BACKENDS:
        raise InvalidArgumentError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "auto":  # MLX where it has a GPU (Metal, CUDA), else the fastest CPU path
        from .kernels.mlx_backend import mlx_gpu_available

        name = "mlx" if mlx_gpu_available() else "onnxruntime"
    if name == "mlx":
        from .kernels.mlx_backend import MlxBackend

        return MlxBackend()
    if name == "numpy":
        from .kernels.numpy_backend import NumpyBackend

        return NumpyBackend()
    from .kernels.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(threads)


class _Cancelled(Exception):
    """Raised between two forward chunks when the caller's cancel event is set."""


@dataclass
class KVState:
    """A KV cache taken out of a Model by swap_cache: the ids it holds and one cache per layer."""

    ids: list[int]
    caches: list
    owner: int  # id() of the Model it belongs to: caches are shaped for that model only

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)


class Model:
    """A loaded model. Calls are serialized by a lock, so threads may share one Model; a stream
    holds the lock from its first chunk until it ends or is closed."""

    def __init__(self, path: Path, backend: str = "auto", kv_cache: str = "f16",
                 memory_budget=None, token_filter=None, ctx_size: int | None = None,
                 threads: int | None = None, prefill_chunk: int = 256,
                 kv_window: int | None = None, kv_sinks: int = 4, kv_residual: int = 128,
                 ffn_share: float | None = None, skip_fraction: float = 0.3,
                 cold_skip_fraction: float | None = None, coalesce_gap: int = 4096,
                 ffn_mode: str = "ours", neuron_window: int = 5, kv_reserve_tokens: int = 1024,
                 direct_io: bool = True, vocab_on_flash: bool | None = None,
                 head_candidates: int = 64, vocab_hot_rows: int = 1024,
                 vocab_cache_rows: int = 4096, prefetch: bool = False,
                 progress: Callable[[int, int, str], None] | None = None,
                 filter_keep: int = DEFAULT_KEEP, filter_layer: int | None = None,
                 filter_threshold: int = DEFAULT_THRESHOLD):
        self.filter_options = FilterOptions(token_filter, filter_keep, filter_layer,
                                            filter_threshold)  # validates
        if prefill_chunk < 1:
            raise InvalidArgumentError(f"prefill_chunk must be >= 1; got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        self.kv_spec = KVSpec(kv_cache, kv_window, kv_sinks, kv_residual)  # validates
        t0 = time.perf_counter()
        self.threads = threads or default_threads()
        self.backend = make_backend(backend, self.threads)
        self.backend.warm()  # the runtime's once-per-process state is not this model's memory
        import gc

        gc.collect()  # models dropped earlier free their memory now, not during the measurement
        release_freed_memory()
        rss0 = rss_bytes()  # the resident part's real cost is measured, not assumed (planner)
        self.path = Path(path)
        self._flash = None
        self._vocab_head = None
        manifest = None
        if is_flash_dir(self.path):
            manifest = open_flash_dir(self.path)
            self._file = GGUFFile(manifest.resident_path)
            model_bytes = manifest.data["source"]["size"]
        else:
            self._file = GGUFFile(self.path)
            model_bytes = self._file.file_size
        self.config = ModelConfig.from_gguf(self._file)
        if ctx_size is not None and ctx_size < 1:
            raise InvalidArgumentError(f"ctx_size must be >= 1; got {ctx_size!r}")
        self.n_ctx = min(ctx_size or self.config.context_length, self.config.context_length)
        self.memory_budget = parse_budget(memory_budget, model_bytes)
        if self.memory_budget is not None:
            limit_heap_retention()  # freed temporaries leave RSS (memory.py says why)
        if ffn_share is not None and not 0 < ffn_share <= 1:
            raise InvalidArgumentError(f"ffn_share must be in (0, 1]; got {ffn_share!r}")
        if manifest is None and (ffn_share is not None or vocab_on_flash
                                 or self._needs_flash(model_bytes, kv_cache, kv_reserve_tokens)):
            from .flash.convert import ensure_converted, progress_line

            self.path = ensure_converted(self.path, progress=progress or progress_line)
            manifest = open_flash_dir(self.path)
            self._file = GGUFFile(manifest.resident_path)
        self.tokenizer = Tokenizer(self._file.path)
        ffn = self._run_flash_ffn if manifest is not None else None
        if vocab_on_flash is None:
            vocab_on_flash = manifest is not None and self._vocab_needs_flash(
                manifest, model_bytes, kv_cache, kv_reserve_tokens)
        self._net = build_model(self._file, self.backend, self.config, ffn=ffn,
                                head=not vocab_on_flash)
        self.plan = None
        if vocab_on_flash:
            self._setup_vocab(manifest, head_candidates, vocab_hot_rows, vocab_cache_rows,
                              direct_io)
        self._warm_segments()
        self._file.release_pages()
        release_freed_memory()
        # What the resident part costs in RSS: weights as ONNX Runtime holds them (Q4_1 ~1.4x
        # its GGUF bytes), sessions, llama.cpp's tokenizer (25 MB for SmolLM2, 45 for Gemma 3).
        # In a process that freed other models, new weights may land in pages it still holds
        # (RSS barely grows): the weights' own bytes are the floor.
        self.resident_rss_bytes = max(rss_bytes() - rss0, self._net.nbytes + self.vocab_bytes)
        self._prefetch = prefetch
        if manifest is not None:
            self._setup_flash(manifest, ffn_share, skip_fraction, ffn_mode, neuron_window,
                              kv_reserve_tokens, kv_cache, direct_io, cold_skip_fraction,
                              coalesce_gap)
        release_freed_memory()  # the flash setup's temporaries (the mapped file is untouched)
        self.kv_cache = kv_cache
        self._caches = self._make_caches()
        self._cached_ids: list[int] = []
        self.chat_template = ChatTemplate.for_model(self._file.get("tokenizer.chat_template"),
                                                    self.config.architecture)
        resolve_layer(self.filter_options, self.config)  # a bad filter_layer fails at load
        self._gemfilter = None
        self._chat_encoder = None
        self._lock = threading.RLock()
        self._cancel = None  # the running stream's cancel event (checked between chunks)
        self._streaming = False  # an RLock lets one thread re-enter: refuse a second open stream
        self.load_s = time.perf_counter() - t0
        self.stats: dict = {"load_s": self.load_s, **self.memory_report()}

    # ---- flash-resident FFN -----------------------------------------------------------------
    def _warm_segments(self) -> None:
        """Run every compiled segment once on a zero row: ONNX Runtime allocates each
        session's run state on its first call (~10 MB for SmolLM2), which belongs in the
        measured resident cost rather than surprising the budget later."""
        net = self._net
        segs = [net.first, *net.head_slices, *getattr(self, "_preview_slices", [])]
        segs += getattr(net, "segments", None) or [*net.pre_ffn, *net.post_ffn]
        for seg in segs:
            widths = getattr(seg, "input_widths", None)
            if widths is None:
                continue
            seg(*[np.zeros((1, w), np.float32) for w in widths])

    # measured: dense SmolLM2 172 MB and Gemma 3 486 MB of RSS over ORT's process state
    # (weights ~1x in ORT; llama.cpp's tokenizer 25 MB / more for Gemma's 262k tokens)
    DENSE_RSS_PER_FILE_BYTE = 1.9

    def _needs_flash(self, model_bytes: int, kv_cache: str, kv_tokens: int) -> bool:
        """A budget below what the dense model costs in RSS (measured: ~1.9x the file with
        the tokenizer and load leftovers) plus the KV reserve switches
        to the flash format, where the planner measures the resident part and sizes the rest."""
        return self.memory_budget is not None and self.memory_budget < (
            self.DENSE_RSS_PER_FILE_BYTE * model_bytes
            + self._kv_reserve_bytes(kv_cache, kv_tokens))

    def _kv_reserve_bytes(self, kv_cache: str, kv_tokens: int) -> int:
        """An upper estimate before the model is built (every layer caching kv_tokens); the
        planner itself counts the caches the model makes (Model._setup_flash)."""
        c = self.config
        # bytes per cached value: f16 2, q8 1 + scales, q4 0.5 + scales (cache/quantized.py:
        # float16 scale + minimum per 128-token key group and per 64-channel value group)
        per_value = {"f16": 2.0, "f32": 4.0, "q8": 1.047, "q4": 0.547}.get(kv_cache, 2.0)
        return int(2 * c.n_layers * c.n_kv_heads * c.head_dim * per_value
                   * min(kv_tokens, self.n_ctx))

    def _vocab_needs_flash(self, manifest, model_bytes, kv_cache, kv_tokens) -> bool:
        """The planner's first choice: the head stays resident if it fits the budget next to
        the other resident weights, the KV reserve and a quarter of the FFN's bundles; else
        the vocabulary goes to flash (two-stage head). The resident part with its head measured
        ~2x the resident file in RSS (SmolLM2: 128 MB for 65 MB: Q4_1 weights ~1.4x in ORT,
        plus the tokenizer's 25 MB)."""
        if self.memory_budget is None:
            return False
        files = manifest.data["files"]
        head = manifest.vocab["rows"] * manifest.vocab["row_bytes"]
        tied = manifest.vocab["tied"]
        resident = files["resident.gguf"]["size"] - (0 if tied else head)
        need = (2.0 * resident + self._kv_reserve_bytes(kv_cache, kv_tokens) + WORKING_BYTES
                + 0.25 * files["ffn.bin"]["size"])
        return self.memory_budget < need

    def _setup_vocab(self, manifest, n_candidates, hot_rows, cache_rows, direct_io):
        """The vocabulary on flash: a resident low-bit preview head (compiled in slices like
        the full head) + rows read on demand; the embedding comes from the same rows when the
        head is tied to it."""
        from gguf import GGMLQuantizationType

        from .vocab.head import TwoStageHead
        from .vocab.rows import VocabRows

        if n_candidates < 1:
            raise InvalidArgumentError(f"head_candidates must be >= 1; got {n_candidates!r}")
        grid, d = manifest.preview(), self.config.d_model
        step = self._net.HEAD_SLICE_ROWS
        slices = []
        for a in range(0, grid.n, step):
            part = grid.rows(a, min(grid.n, a + step))
            slices.append(self.backend.compile(
                self._file, lambda g, h, p=part: [g.linear_packed(h, p)], [d]))
            # the backend copied the slice: its mapped pages leave our RSS now (Gemma 3's
            # preview is 96 MB; kept mapped until the end of the load, it was the load's peak)
            release_mapped_pages(grid.codes, grid.scale, grid.zero)
        self._preview_slices = slices
        v = manifest.vocab
        rows = VocabRows(manifest.path / "vocab.bin", manifest.token_order(),
                         GGMLQuantizationType[v["qtype"]], d, hot_rows, cache_rows,
                         max_batch=1024, direct=direct_io)
        self._vocab_head = TwoStageHead(
            lambda h: np.concatenate([sl(h)[0] for sl in slices], axis=1), rows, n_candidates)
        if v["tied"]:
            self._net.embed_rows = rows.rows

    @property
    def vocab_bytes(self) -> int:
        """DRAM held for the vocabulary on flash: preview head + row pools and buffers."""
        if self._vocab_head is None:
            return 0
        return sum(s.nbytes for s in self._preview_slices) + self._vocab_head.rows.nbytes

    def _setup_flash(self, manifest, ffn_share, skip_fraction, mode, window, kv_tokens,
                     kv_cache, direct_io, cold_skip_fraction, coalesce_gap):
        from .flash.ffn import FlashFFN
        from .flash.planner import plan

        c, lay = self.config, manifest.layout
        if ffn_share is not None:
            capacity = max(1, round(ffn_share * c.ffn_dim))
        else:
            budget = self.memory_budget
            if budget is None:
                import psutil

                budget = int(psutil.virtual_memory().available * 0.5)
            probe = FlashFFN.bytes_per_neuron(lay)
            # the KV reserve from the caches this model will make (Gemma 3's sliding layers
            # keep 512 + slack positions, not kv_tokens)
            kv_tokens = min(kv_tokens, self.n_ctx)
            kv_reserve = sum(cache.bytes_at(kv_tokens, self.prefill_chunk)
                             for cache in self._make_caches())
            self.plan = plan(budget, max(self._net.nbytes + self.vocab_bytes,
                                         self.resident_rss_bytes), kv_reserve, kv_tokens,
                             lay.section * (1 + (FlashFFN.LOOKAHEAD + 1
                                                 if self._prefetch and mode == "ours" else 0)),
                             probe, c.n_layers, c.ffn_dim)
            capacity = self.plan.capacity
        ffn_class = FlashFFN
        if self.backend.name == "mlx":  # the neuron pool gets a twin on the device
            from functools import partial

            from .flash.mlx_ffn import MlxFlashFFN

            ffn_class = partial(MlxFlashFFN, backend=self.backend)
        try:
            self._flash = ffn_class(manifest, c.activation, capacity, skip_fraction=skip_fraction,
                                    cold_skip_fraction=cold_skip_fraction,
                                    coalesce_gap=coalesce_gap, window=window, mode=mode,
                                    threads=max(4, self.threads * 2), direct=direct_io,
                                    # 1: splitting a row's neurons over 2 threads halved the
                                    # kernel alone but not the pipeline (flash/ffn.py)
                                    compute_threads=1,
                                    prefetch=self._prefetch)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None

    def _run_flash_ffn(self, layer, h, gate):
        return self._flash(layer, h, gate)

    def flash_report(self) -> dict:
        out = self._flash.report() if self._flash is not None else {}
        if self._vocab_head is not None:
            out.update(self._vocab_head.report())
        return out

    # ---- text <-> ids ----------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    # ---- memory ------------------------------------------------------------------------------
    @property
    def resident_bytes(self) -> int:
        """Weights held in DRAM: the backend's resident part plus the neuron pools."""
        return (self._net.nbytes + (self._flash.nbytes if self._flash is not None else 0)
                + self.vocab_bytes)

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self._caches)

    def memory_report(self) -> dict:
        return {"resident_bytes": self.resident_bytes, "kv_bytes": self.kv_bytes,
                "file_bytes": self._file.file_size}

    def _make_caches(self):
        c, cores = self.config, self._net.cores
        return self.backend.make_kv_caches(self.kv_spec, c.n_layers, c.n_kv_heads, c.head_dim,
                                           sliding_windows=[core.window for core in cores],
                                           rope_shifts=[core.shift_keys for core in cores])

    @property
    def bounded(self) -> bool:
        """True when every layer's cache is bounded: a context may then run past n_ctx."""
        return self.kv_spec.bounded

    def kv_bytes_needed(self, n_tokens: int) -> int:
        """Bytes the KV cache holds after n_tokens positions (a bounded cache levels off)."""
        return sum(c.bytes_at(n_tokens, self.prefill_chunk) for c in self._caches)

    def kv_budget_bytes(self) -> int | None:
        """What memory_budget leaves for the KV cache (None: no budget given): the budget less
        the resident part as measured in RSS, the neuron pools and read buffers, and the
        working memory the planner reserves."""
        if self.memory_budget is None:
            return None
        return self.memory_budget - self.held_bytes

    @property
    def held_bytes(self) -> int:
        """What the model holds besides its KV cache, as the planner counts it."""
        pools = self._flash.nbytes if self._flash is not None else 0
        return self.resident_rss_bytes + pools + WORKING_BYTES

    def _check_kv_budget(self, n_tokens: int) -> None:
        budget = self.kv_budget_bytes()
        if budget is None:
            return
        need = self.kv_bytes_needed(n_tokens)
        if need > budget:
            from .memory import format_bytes

            hint = ("; a smaller kv_window would fit" if self.bounded else
                    "; try kv_cache='q4', a bounded cache (kv_window=...), or a larger budget")
            raise KVBudgetError(
                f"a context of {n_tokens} tokens needs {format_bytes(need)} of KV cache "
                f"({self.kv_spec.kind}); the memory budget of {format_bytes(self.memory_budget)} "
                f"leaves {format_bytes(max(budget, 0))} after {format_bytes(self.held_bytes)} "
                f"of weights and working memory{hint}")

    def reset(self) -> None:
        """Forget the KV cache (the next call prefills from scratch)."""
        with self._lock:
            self._caches = self._make_caches()
            self._cached_ids = []

    def swap_cache(self, state: KVState | None = None) -> KVState:
        """Take the KV cache (and the ids it holds) out of the model and put state in its place
        (None: an empty cache). A server keeps one KVState per conversation, so interleaved
        conversations each reuse their own prefix; a KVState's memory is its nbytes."""
        with self._lock:
            self._refuse_nested("swap_cache")
            if state is not None and state.owner != id(self):
                raise InvalidArgumentError("this KVState belongs to another Model")
            old = KVState(self._cached_ids, self._caches, id(self))
            if state is None:
                self._caches, self._cached_ids = self._make_caches(), []
            else:
                self._caches, self._cached_ids = state.caches, state.ids
            return old

    def _refuse_nested(self, what: str) -> None:
        if self._streaming:
            raise InvalidArgumentError(
                f"{what}: a stream on this model is still open in this thread; finish it or "
                "close() it first")

    def close(self) -> None:
        with self._lock:
            if self._flash is not None:
                self._flash.close()
                self._flash = None
            if self._vocab_head is not None:
                self._vocab_head.rows.close()
                self._vocab_head = None
            self._caches, self._cached_ids, self._net = [], [], None
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- forward -------------------------------------------------------------------------------
    def _head(self, h: np.ndarray, exact: bool) -> np.ndarray:
        """(T, d) final hidden states -> (T, vocab) logits: the resident head, or with the
        vocabulary on flash the two-stage head (generation) or the streamed exact head."""
        if self._vocab_head is None:
            return self._net.head(h)
        h = self.backend.to_host(h)  # the two-stage head works on host arrays
        return self._vocab_head.full(h) if exact else self._vocab_head(h)

    def _forward(self, ids: Sequence[int], all_logits: bool, hidden: bool = False) -> np.ndarray:
        """Feed ids after the cache in chunks; logits of the last position (vocab,) or all
        (or with hidden=True the final-normed hidden states of all, (T, d))."""
        total = len(self._cached_ids) + len(ids)
        if total > self.n_ctx and not self.bounded:
            raise ContextLengthError(
                f"{total} tokens do not fit the context of {self.n_ctx} tokens")
        self._check_kv_budget(total)
        outs = []
        try:
            for s in range(0, len(ids), self.prefill_chunk):
                if self._cancel is not None and self._cancel.is_set():
                    raise _Cancelled
                chunk = list(ids[s : s + self.prefill_chunk])
                h = self._net.forward(np.asarray(chunk, np.int64), self._caches)
                self._cached_ids.extend(chunk)
                if hidden:
                    outs.append(h)
                elif all_logits:
                    outs.append(self._head(h, exact=True))
                elif s + self.prefill_chunk >= len(ids):
                    outs.append(self._head(h[-1:], exact=False))
        except BaseException:
            # Ctrl-C or an error mid-chunk: roll every layer back to what _cached_ids says.
            for c in self._caches:
                c.trim(c.offset - len(self._cached_ids))
            raise
        return np.concatenate(outs) if all_logits or hidden else outs[-1][0]

    def _reuse_prefix(self, ids: Sequence[int]) -> int:
        """Trim the cache to its longest common prefix with ids (keeping >= 1 id to run)."""
        n = 0
        limit = min(len(self._cached_ids), len(ids) - 1)
        while n < limit and self._cached_ids[n] == ids[n]:
            n += 1
        drop = len(self._cached_ids) - n
        for c in self._caches:
            c.trim(drop)
        if any(c.offset != n for c in self._caches):
            # a bounded cache had already dropped positions it would need: start over
            self._caches = self._make_caches()
            n = 0
        del self._cached_ids[n:]
        return n

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), vocab) float32 logits through the prompt path (chunked, with the cache)."""
        ids = self._check_ids(ids)
        with self._lock:
            self.reset()
            return self._forward(ids, all_logits=True)

    def hidden_states(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), d_model) final-normed hidden states (what the head multiplies), for
        measuring heads against each other."""
        ids = self._check_ids(ids)
        with self._lock:
            self.reset()
            return self._forward(ids, all_logits=False, hidden=True)

    def _check_ids(self, ids) -> list[int]:
        if self._net is None:
            raise InvalidArgumentError("this model is closed; load it again")
        ids = [int(i) for i in ids]
        if not ids:
            raise InvalidArgumentError("need at least one token")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise InvalidArgumentError(f"token id {bad[0]} is outside the vocabulary "
                                       f"(0..{self.config.vocab_size - 1})")
        if len(ids) > self.n_ctx and not self.bounded:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens; the context holds {self.n_ctx}")
        return ids

    # ---- prompt cache on disk -------------------------------------------------------------------
    def save_cache(self, path) -> None:
        """Write the KV cache and the ids it holds to path (atomically: a temporary name, then
        a rename), with this model's identity and a checksum."""
        from .cache.persist import save_prompt_cache

        with self._lock:
            save_prompt_cache(path, self._identity(), self.kv_spec, self._cached_ids,
                              self._caches)

    def load_cache(self, path) -> int:
        """Replace the KV cache with one saved by save_cache; returns the positions it holds.
        A file from another model or cache kind, or a damaged one, raises CacheFileError."""
        from .cache.persist import load_prompt_cache

        with self._lock:
            caches = self._make_caches()
            ids = load_prompt_cache(path, self._identity(), self.kv_spec, caches)
            self._caches, self._cached_ids = caches, ids
            return len(ids)

    def _identity(self) -> dict:
        from .cache.persist import model_identity

        if getattr(self, "_identity_cache", None) is None:  # hashes the metadata: once
            self._identity_cache = model_identity(self._file, self.config)
        return self._identity_cache

    # ---- generation ------------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], max_tokens: int = 256,
               temperature: float = 0.0, top_k: int = 40, top_p: float = 0.95,
               min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
               seed: int | None = None, stop: str | Sequence[str] | None = None,
               cancel: threading.Event | None = None,
               **filter_overrides) -> Iterator[GenerationChunk]:
        """Yield GenerationChunk(text, token, stats) as tokens are generated.

        prompt: text (tokenized with BOS, special tokens parsed) or token ids. Generation ends at
        an end-of-generation token, a stop string (not included), max_tokens, or the context end.
        cancel: an event another thread may set; the stream then stops within one token (or one
        prefill chunk), frees the KV cache and ends with a chunk whose finish_reason is
        "cancelled".
        filter_overrides: token_filter, filter_keep, filter_layer, filter_threshold for this
        call (default: what load() was given).
        """
        options = self._filter_options(filter_overrides)
        validate_sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n)
        if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 0:
            raise InvalidArgumentError(f"max_tokens must be an integer >= 0; got {max_tokens!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        ids = self._check_ids(ids)
        sampler = make_sampler(temperature, top_k, top_p, min_p, seed)
        penalty = make_repetition_penalty(repeat_penalty, repeat_last_n)
        return self._stream(ids, max_tokens, sampler, [penalty] if penalty else [], stops,
                            cancel, options)

    # ---- token filter (GemFilter) ------------------------------------------------------------
    _FILTER_KEYS = {"token_filter": "mode", "filter_keep": "keep", "filter_layer": "layer",
                    "filter_threshold": "threshold"}

    def _filter_options(self, overrides: dict) -> FilterOptions:
        bad = sorted(set(overrides) - set(self._FILTER_KEYS))
        if bad:
            raise InvalidArgumentError(f"unknown generation option {bad[0]!r}")
        if not overrides:
            return self.filter_options
        import dataclasses

        options = dataclasses.replace(
            self.filter_options, **{self._FILTER_KEYS[k]: v for k, v in overrides.items()})
        resolve_layer(options, self.config)
        return options

    def filter_prompt(self, ids: Sequence[int], keep: int = DEFAULT_KEEP,
                      layer: int | None = None) -> FilterResult:
        """GemFilter's pass 1 and selection alone: which of ids a filtered call would keep."""
        layer = resolve_layer(FilterOptions("gemfilter", keep, layer), self.config)
        with self._lock:
            return self.gemfilter(list(ids), keep, layer)

    @property
    def gemfilter(self) -> GemFilter:
        """The GemFilter of this model (built on first use: it reads the token types)."""
        if self._gemfilter is None:
            self._gemfilter = GemFilter(self._net, self.config, self.control_tokens,
                                        self.tokenizer.token_text, self._make_caches,
                                        self.prefill_chunk)
        return self._gemfilter

    @functools.cached_property
    def control_tokens(self) -> np.ndarray:
        """(vocab,) bool: the vocabulary's control tokens (<bos>, <start_of_turn>, ...), from
        the GGUF's token types (read once: 262k of them for Gemma 3)."""
        kinds = np.asarray(self._file.get("tokenizer.ggml.token_type", []), np.int64)
        is_control = np.zeros(self.config.vocab_size, bool)
        is_control[: len(kinds)] = kinds[: self.config.vocab_size] == CONTROL_TOKEN
        return is_control

    def _stream(self, ids, max_tokens, sampler, processors, stops, cancel=None, options=None):
        with self._lock:
            self._refuse_nested("stream")
            self._streaming, self._cancel = True, cancel
            try:
                yield from self._stream_locked(ids, max_tokens, sampler, processors, stops,
                                               options)
            except _Cancelled:
                # the caller gave up: drop its cache now rather than hold it until the next call
                self._caches, self._cached_ids = self._make_caches(), []
                self.stats.update(kv_bytes=0, cancelled=True)
                yield GenerationChunk("", None, dict(self.stats), "cancelled")
            finally:
                self._streaming, self._cancel = False, None

    def _stream_locked(self, ids, max_tokens, sampler, processors, stops, options=None):
        with self._lock:  # re-entered: _stream holds it
            t0 = time.perf_counter()
            options = options or self.filter_options
            n_prompt = len(ids)
            filtered = None
            if options.applies(len(ids)):
                filtered = self.filter_prompt(ids, options.keep, options.layer)
                ids = filtered.kept_ids  # pass 2 runs these from position 0 (or a cached prefix)
            reused = self._reuse_prefix(ids)
            stats = {"prompt_tokens": n_prompt, "prompt_tokens_reused": reused,
                     "generated_tokens": 0, "backend": self.backend.name,
                     "flash_bytes_read": 0, "flash_reads": 0, "neuron_cache_hit_rate": None,
                     "token_filter": "gemfilter" if filtered else None,
                     "filter_tokens_before": n_prompt, "filter_tokens_after": len(ids),
                     "filter_layer": filtered.layer if filtered else None,
                     "filter_pass1_s": filtered.pass1_s if filtered else 0.0,
                     "filter_pass1_bytes": filtered.pass1_bytes if filtered else 0,
                     "filter_pass2_s": None}
            t_pass2 = time.perf_counter()
            if self._flash is not None:
                self._flash.reset_counters()
            self.stats = stats
            if max_tokens == 0:
                self._forward(ids[reused:], all_logits=False)
                now = time.perf_counter()
                stats["filter_pass2_s"] = now - t_pass2
                stats.update(self._timing(t0, t0, now, 0, len(ids) - reused))
                return
            decoder = self.tokenizer.stream_decoder()
            matcher = StopMatcher(stops)
            gen = generate_step(lambda p: self._forward(p, False),
                                lambda t: self._forward([t], False),
                                ids[reused:], sampler, processors, history=ids[:reused])
            t_first = None
            finish = None
            n = 0
            self._flash_at_first = None
            try:
                for token in gen:
                    now = time.perf_counter()
                    if t_first is None:
                        t_first = now
                        self._flash_at_first = self.flash_report()
                        stats["filter_pass2_s"] = now - t_pass2
                    n += 1
                    stats.update(self._timing(t0, t_first, now, n, len(ids) - reused))
                    if self.tokenizer.is_eog(token):
                        finish = "stop"
                        yield GenerationChunk(matcher.flush() + decoder.flush(), None,
                                              dict(stats), finish)
                        return
                    text, hit = matcher.feed(decoder.add(token))
                    if hit:
                        yield GenerationChunk(text, token, dict(stats), "stop")
                        return
                    room = self.bounded or len(self._cached_ids) + 1 < self.n_ctx
                    if n >= max_tokens or not room:
                        finish = "length"
                        text += matcher.feed(decoder.flush())[0] + matcher.flush()
                    yield GenerationChunk(text, token, dict(stats), finish)
                    if finish:
                        return
            finally:
                gen.close()

    def _timing(self, t0, t_first, now, n, prefilled):
        ttft = t_first - t0
        flash = self.flash_report()
        first = getattr(self, "_flash_at_first", None)
        if flash and first and n > 1:  # decode only: what each generated token cost
            for key in ("flash_bytes_read", "flash_reads", "io_s", "memory_management_s",
                        "compute_s", "vocab_bytes_read", "vocab_reads", "head_s"):
                if key in flash:
                    flash[f"{key}_per_token"] = (flash[key] - first[key]) / (n - 1)
            if "head_s_per_token" in flash and now > t_first:
                flash["head_time_share"] = flash["head_s_per_token"] * (n - 1) / (now - t_first)
        return {
            **flash,
            "ttft_s": ttft,
            "prefill_tokens": prefilled,
            "prefill_tokens_per_s": prefilled / ttft if ttft > 0 else None,
            "generated_tokens": n,
            "tokens_per_s": (n - 1) / (now - t_first) if n > 1 and now > t_first else None,
            "elapsed_s": now - t0,
            "kv_bytes": self.kv_bytes,
            "resident_bytes": self.resident_bytes,
            "peak_rss_bytes": peak_rss_bytes(),
            "rss_bytes": rss_bytes(),
        }

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, **kw) -> str:
        return "".join(c.text for c in self.stream(prompt, max_tokens=max_tokens, **kw))

    # ---- chat ----------------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        tok = self.tokenizer
        bos = tok.token_text(tok.bos_id) if tok.bos_id >= 0 else ""
        text = self.chat_template.render(messages, bos_token=bos,
                                         eos_token=tok.token_text(tok.eos_id),
                                         add_generation_prompt=add_generation_prompt)
        # A template that writes BOS itself (Gemma's) must not get a second one.
        add_bos = not (bos and text.startswith(bos))
        return self.chat_encoder.encode(text, add_bos=add_bos)

    @property
    def chat_encoder(self) -> SegmentedEncoder:
        """Tokenizes rendered chats a piece between special tokens at a time, remembering
        the pieces: each turn tokenizes its new text, not the whole history again."""
        if self._chat_encoder is None:
            tok, is_control = self.tokenizer, self.control_tokens
            probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "user", "content": "c"}]
            try:
                text = self.chat_template.render(probe, bos_token="", eos_token="",
                                                 add_generation_prompt=True)
            except Exception:  # a template that wants something else: no markers
                text = ""
            markers = {tok.token_text(i) for i in tok.encode(text, add_bos=False)
                       if i < len(is_control) and is_control[i]}
            self._chat_encoder = SegmentedEncoder(tok, sorted(markers))
        return self._chat_encoder

    def stream_chat(self, messages, **kw) -> Iterator[GenerationChunk]:
        return self.stream(self.apply_chat_template(messages), **kw)

    def chat(self, messages, **kw) -> str:
        return "".join(c.text for c in self.stream_chat(messages, **kw))


def load(model=None, memory_budget=None, backend: str = "auto", kv_cache: str = "f16",
         token_filter=None, **options) -> Model:
    """Load a model: None (the bundled default), a short name, or a .gguf path.

    Token filter: token_filter None | "gemfilter" | "auto" (gemfilter from filter_threshold
    prompt tokens on, default 4096); filter_keep (default 1024) tokens kept, filter_layer (default:
    the model's, see filter/gemfilter.py) the layer that scores them.

    KV cache options: kv_cache "f16" | "q8" | "q4"; kv_window=N bounds the cache to kv_sinks
    (default 4) first + at least N recent positions (StreamingLLM), so a context may run past
    the model's; kv_residual (default 128) recent positions stay float16 in q8/q4.
    progress(step, total, what): called while a first load converts the model to the flash
    format (a budget below what it needs, or ffn_share=); None prints a bar on stderr. An
    exception raised by it stops the conversion and leaves nothing behind."""
    return Model(resolve_model(model), backend=backend, kv_cache=kv_cache,
                 memory_budget=memory_budget, token_filter=token_filter, **options)
