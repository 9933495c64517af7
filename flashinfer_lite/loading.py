"""Loading a model: the backend, the file (converted to the flash format when the budget asks),
the network with its FFN and embedding providers, the vocabulary on flash, the memory plan.

The order follows memory: the resident part (segments, heads, tokenizer) is built first and
measured in RSS, then the planner gives what is left to the neuron pools. So the net is built
with the FFN on flash as a provider whose pools open once that measurement is in.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from .config import ModelConfig
from .errors import InvalidArgumentError
from .flash.convert import ensure_converted, progress_line
from .flash.ffn import FlashFFN
from .flash.mlx_ffn import MlxFlashFFN
from .flash.planner import Plan
from .kernels.base import Backend
from .kernels.mlx_backend import MlxBackend, mlx_gpu_available
from .kernels.numpy_backend import NumpyBackend
from .kernels.onnxruntime_backend import OnnxRuntimeBackend
from .loaders.disk_curve import load_curve
from .loaders.flash_format import FlashManifest, is_flash_dir, open_flash_dir
from .loaders.gguf_file import GGUFFile
from .memory import (
    WORKING_BYTES,
    limit_heap_retention,
    parse_budget,
    release_freed_memory,
    release_mapped_pages,
    rss_bytes,
)
from .models import build_model
from .models.common import CausalLM
from .options import (
    DEFAULT_CHUNK,
    FLASH_BUDGET_CHUNK,
    FlashOptions,
    LoadOptions,
    VocabOptions,
)
from .planning import kv_reserve_bytes, needs_flash, pool_plan, vocab_needs_flash
from .tokenizer import Tokenizer
from .vocab.head import TwoStageHead
from .vocab.rows import VocabRows


def make_backend(name: str, threads: int) -> Backend:
    if name == "auto":  # MLX where it has a GPU (Metal, CUDA), else the fastest CPU path
        name = "mlx" if mlx_gpu_available() else "onnxruntime"
    if name == "mlx":
        return MlxBackend()
    if name == "numpy":
        return NumpyBackend()
    return OnnxRuntimeBackend(threads)


# Reads in flight for the FFN's bundles: 16-256 KiB reads ran ~3x faster at 8 in flight than
# one at a time here, and little faster past 8 (benchmarks/probe_disk.py)
READ_DEPTH = 8
# The coalescing gap where the disk was never probed: between this disk's 31-46 KB at 8-32 in
# flight and the few KB a fast NVMe SSD's lower latency implies
DEFAULT_GAP = 16 * 1024


class FlashFFNProvider:
    """The FFN on flash as the net calls it: (layer, h (T, d)) -> (T, d).

    Made before the net, which is built with it; `open(capacity)` sizes its neuron pools once
    the resident part has been measured (the planner needs that number, and the measurement
    needs the net)."""

    def __init__(self, manifest: FlashManifest, activation: str, options: FlashOptions,
                 backend: Backend, threads: int):
        self.manifest, self.activation, self.options = manifest, activation, options
        self.backend, self.threads = backend, threads
        self.ffn: FlashFFN | None = None

    def open(self, capacity: int, gate_rows: int | None = None) -> None:
        """capacity: neurons per layer pool; gate_rows: gate rows per layer held (None: all)."""
        o = self.options
        # on MLX the neuron pool gets a twin on the device
        make = (partial(MlxFlashFFN, backend=self.backend) if self.backend.name == "mlx"
                else FlashFFN)
        gap = o.coalesce_gap
        if gap is None:
            curve = load_curve(engine="python")  # the reader is a pool of preadv threads
            gap = DEFAULT_GAP if curve is None else curve.coalesce_gap(READ_DEPTH)
        try:
            self.ffn = make(self.manifest, self.activation, capacity,
                            skip_fraction=o.skip_fraction,
                            cold_skip_fraction=o.cold_skip_fraction, coalesce_gap=gap,
                            window=o.neuron_window, mode=o.mode,
                            threads=READ_DEPTH, direct=o.direct_io,
                            compute_threads=self.threads, prefetch=o.prefetch,
                            gate_rows=gate_rows, gate_threads=self.threads)
        except ValueError as exc:  # a skip fraction the conversion did not calibrate
            raise InvalidArgumentError(str(exc)) from None

    def __call__(self, layer: int, h):
        return self.ffn(layer, h)

    @property
    def nbytes(self) -> int:
        return self.ffn.nbytes if self.ffn is not None else 0

    def report(self) -> dict:
        return self.ffn.report() if self.ffn is not None else {}

    def close(self) -> None:
        if self.ffn is not None:
            self.ffn.close()
            self.ffn = None


class VocabOnFlash:
    """The vocabulary on flash: a resident low-bit preview head (compiled in slices like the
    full head) and rows read on demand, which also give the embedding when the head is tied
    to it."""

    def __init__(self, manifest: FlashManifest, f: GGUFFile, backend: Backend, d_model: int,
                 options: VocabOptions, direct_io: bool):
        grid, step = manifest.preview(), CausalLM.HEAD_SLICE_ROWS
        self.slices = []
        for a in range(0, grid.n, step):
            part = grid.rows(a, min(grid.n, a + step))
            self.slices.append(backend.compile(
                f, lambda g, h, p=part: [g.linear_packed(h, p)], [d_model]))
            # the backend copied the slice: its mapped pages leave our RSS now (Gemma 3's
            # preview is 96 MB; kept mapped until the end of the load, it was the load's peak)
            release_mapped_pages(grid.codes, grid.scale, grid.zero)
        v = manifest.vocab
        self.rows = VocabRows(manifest.path / "vocab.bin", manifest.token_order(),
                              GGMLQuantizationType[v["qtype"]], d_model, options.hot_rows,
                              options.cache_rows, max_batch=1024, direct=direct_io)
        self.head = TwoStageHead(self._preview, self.rows, options.head_candidates)
        self.backend = backend
        self.embed_rows = self.rows.rows if v["tied"] else None

    def _preview(self, h: np.ndarray) -> np.ndarray:
        return np.concatenate([s(h)[0] for s in self.slices], axis=1)

    def logits(self, h, exact: bool) -> np.ndarray:
        """(T, d) -> (T, vocab): the two-stage head (generation) or every exact row streamed
        (evaluation)."""
        h = self.backend.to_host(h)  # the two-stage head works on host arrays
        return self.head.full(h) if exact else self.head(h)

    @property
    def nbytes(self) -> int:
        """DRAM held: the preview head, the row pools and buffers."""
        return sum(s.nbytes for s in self.slices) + self.rows.nbytes

    def close(self) -> None:
        self.rows.close()


def warm_segments(net: CausalLM, vocab: VocabOnFlash | None, chunk: int) -> None:
    """Run every compiled segment once on a zero row, and the layers' segments also on a
    prompt chunk of rows: ONNX Runtime allocates each session's run state on its first call
    (~10 MB for SmolLM2) and grows it with the rows of a call (~17 MB more over the 1.5B's 57
    sessions at 64 rows), which belongs in the measured resident cost rather than surprising
    the budget later. The head runs on one row per prompt."""
    layers = [net.first, *(getattr(net, "segments", None) or [*net.pre_ffn, *net.post_ffn])]
    for rows, segs in ((1, [*net.head_slices, *(vocab.slices if vocab else [])]),
                       (1, layers), (chunk, layers)):
        for seg in segs:
            widths = getattr(seg, "input_widths", None)
            if widths is not None:
                seg(*[np.zeros((rows, w), np.float32) for w in widths])


@dataclass
class LoadedModel:
    """What a load produced; Model holds these parts."""

    path: Path  # the GGUF, or the flash directory it was converted to
    file: GGUFFile  # the GGUF holding the resident weights and the tokenizer
    config: ModelConfig
    tokenizer: Tokenizer
    backend: Backend
    threads: int
    net: CausalLM
    n_ctx: int
    memory_budget: int | None
    ffn: FlashFFNProvider | None
    vocab: VocabOnFlash | None
    plan: Plan | None  # when the planner sized the neuron pools
    resident_rss_bytes: int  # what the resident part costs in RSS, as measured
    prefill_chunk: int  # prompt tokens per forward pass (options.RuntimeOptions says how)
    load_s: float

    @property
    def flash(self) -> FlashFFN | None:
        """The FFN on flash, once its pools are open; None for a dense model."""
        return self.ffn.ffn if self.ffn is not None else None

    @property
    def vocab_head(self) -> TwoStageHead | None:
        """The two-stage head when the vocabulary is on flash."""
        return self.vocab.head if self.vocab is not None else None

    @property
    def vocab_bytes(self) -> int:
        """DRAM held for the vocabulary on flash: preview head + row pools and buffers."""
        return self.vocab.nbytes if self.vocab is not None else 0

    @property
    def pool_bytes(self) -> int:
        """The FFN's neuron pools and read buffers."""
        return self.ffn.nbytes if self.ffn is not None else 0

    @property
    def resident_bytes(self) -> int:
        """Weights held in DRAM: the backend's resident part plus the neuron pools."""
        return self.net.nbytes + self.pool_bytes + self.vocab_bytes

    @property
    def held_bytes(self) -> int:
        """What the model holds besides its KV cache, as the planner counts it (a prompt
        chunk's transients included: the KV cache may not grow into them)."""
        transient = self.plan.transient_bytes if self.plan is not None else 0
        # the lookahead's buffers (decoding only) give their pages to a prompt chunk's arrays
        ring = self.flash.ring_bytes if self.flash is not None else 0
        return (self.resident_rss_bytes + self.pool_bytes + WORKING_BYTES
                + max(transient - ring, 0))

    def flash_report(self) -> dict:
        """The FFN's and the vocabulary's reads and timings since their counters were reset."""
        out = self.ffn.report() if self.ffn is not None else {}
        if self.vocab_head is not None:
            out.update(self.vocab_head.report())
        return out

    def head(self, h, exact: bool):
        """(T, d) final hidden states -> (T, vocab) logits: the resident head, or the
        vocabulary on flash's (two-stage, or exact when asked)."""
        return self.net.head(h) if self.vocab is None else self.vocab.logits(h, exact)

    def close(self) -> None:
        for part in (self.ffn, self.vocab):
            if part is not None:
                part.close()
        self.ffn = self.vocab = self.net = None
        self.file.close()


def load_model(path, options: LoadOptions) -> LoadedModel:
    rt, kv, fo = options.runtime, options.kv, options.flash
    t0 = time.perf_counter()
    threads = rt.n_threads
    backend = make_backend(rt.backend, threads)
    backend.warm()  # the runtime's once-per-process state is not this model's memory
    gc.collect()  # models dropped earlier free their memory now, not during the measurement
    release_freed_memory()
    rss0 = rss_bytes()  # the resident part's real cost is measured, not assumed (planner)
    path = Path(path)
    manifest = open_flash_dir(path) if is_flash_dir(path) else None
    f = GGUFFile(manifest.resident_path if manifest else path)
    model_bytes = manifest.data["source"]["size"] if manifest else f.file_size
    config = ModelConfig.from_gguf(f)
    n_ctx = min(rt.ctx_size or config.context_length, config.context_length)
    budget = parse_budget(rt.memory_budget, model_bytes)
    if budget is not None:
        limit_heap_retention()  # freed temporaries leave RSS (memory.py says why)
    reserve = kv_reserve_bytes(backend, config, kv, n_ctx, rt.prefill_chunk or DEFAULT_CHUNK)
    if manifest is None and (fo.ffn_share is not None or options.vocab.on_flash
                             or needs_flash(budget, model_bytes, reserve)):
        path = ensure_converted(path, progress=rt.progress or progress_line)
        manifest = open_flash_dir(path)
        f = GGUFFile(manifest.resident_path)
    chunk = rt.prefill_chunk or (FLASH_BUDGET_CHUNK if manifest is not None and budget
                                 else DEFAULT_CHUNK)
    tokenizer = Tokenizer(f.path)
    on_flash = options.vocab.on_flash
    if on_flash is None:
        on_flash = manifest is not None and vocab_needs_flash(budget, manifest, reserve)
    vocab = (VocabOnFlash(manifest, f, backend, config.d_model, options.vocab, fo.direct_io)
             if on_flash else None)
    ffn = (FlashFFNProvider(manifest, config.activation, fo, backend, threads)
           if manifest is not None else None)
    net = build_model(f, backend, config, ffn=ffn, head=not on_flash,
                      embed_rows=vocab.embed_rows if vocab else None)
    warm_segments(net, vocab, chunk)
    f.release_pages()
    release_freed_memory()
    # What the resident part costs in RSS: weights as ONNX Runtime holds them (Q4_1 ~1.4x
    # its GGUF bytes), sessions, llama.cpp's tokenizer (25 MB for SmolLM2, 45 for Gemma 3).
    # In a process that freed other models, new weights may land in pages it still holds
    # (RSS barely grows): the weights' own bytes are the floor.
    resident = max(rss_bytes() - rss0, net.nbytes + (vocab.nbytes if vocab else 0))
    plan = None
    if ffn is not None:
        plan = pool_plan(budget, resident, net, manifest.layout, kv, fo, n_ctx,
                         chunk)
        if plan is None:  # a fixed pool share: the gate is held whole
            ffn.open(max(1, round(fo.ffn_share * config.ffn_dim)))
        else:
            ffn.open(plan.capacity, plan.gate_rows)
    release_freed_memory()  # the flash setup's temporaries (the mapped file is untouched)
    return LoadedModel(path, f, config, tokenizer, backend, threads, net, n_ctx, budget, ffn,
                       vocab, plan, resident, chunk, time.perf_counter() - t0)
