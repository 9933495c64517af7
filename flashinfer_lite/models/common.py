"""Pieces shared by the architectures: the attention core, embeddings, the segment plan, the head.

A forward pass alternates two kinds of work per layer (see kernels/base.py):
  segment i  (backend): o-projection of layer i-1, residuals, norms, FFN, q/k/v of layer i
  core i     (numpy):   q/k norms, RoPE, KV cache, softmax attention of layer i
An architecture supplies the pieces (attention_inputs, attention_residual, ffn_input,
feed_forward, ffn_residual) as builder functions.

With an external FFN (flash-resident weights, or a recording one for calibration), each segment
splits in two around it: [o-projection, residual, FFN norm] -> FFN(h) -> [residual, q/k/v].
"""

from __future__ import annotations

import numpy as np

from ..cache.kv import KVCache
from ..config import ModelConfig
from ..kernels.base import Backend, GraphBuilder
from ..kernels.ops import apply_rope, rms_norm, rope_tables
from ..loaders.gguf_file import GGUFFile


def optional_dense(f: GGUFFile, name: str) -> np.ndarray | None:
    return f.dense(name) if name in f.tensors else None


class RopeTable:
    """cos, sin rows of one RoPE configuration, shared by the layers that use it, for one block
    of at least STEP positions at a time (recomputed when a call leaves it: once per STEP
    decoded tokens). A table of every position seen was 1 KB per position per layer at
    head_dim 256 (18 tables, 590 MB at 32k positions on Gemma 3, plus float64 temporaries
    whenever one grew); a block is 1 MB per configuration."""

    STEP = 1024

    def __init__(self, head_dim: int, base: float, scale: float, freq_factors):
        self.head_dim, self.base, self.scale = head_dim, base, scale
        self.freq_factors = freq_factors
        self.start = 0
        self.cos = self.sin = np.zeros((0, head_dim // 2), np.float32)

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (T, head_dim // 2) for integer positions (T,)."""
        lo, hi = int(positions.min()), int(positions.max()) + 1
        if lo < self.start or hi > self.start + len(self.cos):
            self.start = lo
            self.cos, self.sin = rope_tables(np.arange(lo, lo + max(self.STEP, hi - lo)),
                                             self.head_dim, self.base, self.scale,
                                             self.freq_factors)
        return self.cos[positions - self.start], self.sin[positions - self.start]


class AttentionCore:
    """One layer's attention after the projections: q/k RMSNorm, RoPE, cache, softmax."""

    def __init__(self, f: GGUFFile, cfg: ModelConfig, layer: int, backend: Backend,
                 rope_tables: dict | None = None):
        """rope_tables: {(base, scale): RopeTable} shared by a model's layers (None: own)."""
        p = f"blk.{layer}."
        self.cfg, self.backend = cfg, backend
        self.q_norm = optional_dense(f, p + "attn_q_norm.weight")
        self.k_norm = optional_dense(f, p + "attn_k_norm.weight")
        sliding = cfg.is_sliding(layer)
        self.window = cfg.sliding_window if sliding else None
        self.rope_base = cfg.rope_base_local if sliding and cfg.rope_base_local else cfg.rope_base
        # Linear RoPE scaling applies to the global layers only (llama.cpp: freq_scale_swa = 1).
        self.rope_scale = 1.0 if sliding else cfg.rope_scale
        self.freq_factors = optional_dense(f, "rope_freqs.weight")  # Llama 3.1 long-context
        tables = {} if rope_tables is None else rope_tables
        key = (self.rope_base, self.rope_scale)
        if key not in tables:
            tables[key] = RopeTable(cfg.head_dim, self.rope_base, self.rope_scale,
                                    self.freq_factors)
        self._rope_table = tables[key]

    def _rope(self, positions: np.ndarray):
        return self._rope_table.rows(positions)

    def shift_keys(self, k: np.ndarray, delta: int) -> np.ndarray:
        """Keys (n, Hkv, D) rotated by RoPE at some positions -> at those positions + delta
        (rotations compose), for a bounded cache that re-positions its attention sinks."""
        cos, sin = rope_tables(np.full(len(k), delta), self.cfg.head_dim, self.rope_base,
                               self.rope_scale, self.freq_factors)
        return apply_rope(k, cos, sin, self.cfg.rope_type)

    def rotate(self, q, k, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Projected q (T, H*D), k (T, Hkv*D) -> q (T, H, D), k (T, Hkv, D) after the q/k norms
        and RoPE at `positions`: what attention scores (also the token filter's input)."""
        c = self.cfg
        t = q.shape[0]
        q = q.reshape(t, c.n_heads, c.head_dim)  # (T, H, D)
        k = k.reshape(t, c.n_kv_heads, c.head_dim)  # (T, Hkv, D)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, c.norm_eps)
            k = rms_norm(k, self.k_norm, c.norm_eps)
        cos, sin = self._rope(positions)
        qk = apply_rope(np.concatenate([q, k], axis=1), cos, sin, c.rope_type)  # (T, H+Hkv, D)
        return qk[:, : c.n_heads], qk[:, c.n_heads :]

    def rotate_keys(self, k, positions: np.ndarray) -> np.ndarray:
        """Projected k (T, Hkv*D) -> (T, Hkv, D) after the k norm and RoPE: rotate's keys alone
        (the token filter scores every key but only the last query)."""
        c = self.cfg
        k = k.reshape(len(k), c.n_kv_heads, c.head_dim)  # (T, Hkv, D)
        if self.k_norm is not None:
            k = rms_norm(k, self.k_norm, c.norm_eps)
        cos, sin = self._rope(positions)
        return apply_rope(k, cos, sin, c.rope_type)

    def __call__(self, q, k, v, cache: KVCache, positions: np.ndarray) -> np.ndarray:
        c = self.cfg
        q, k = self.rotate(q, k, positions)
        v = v.reshape(q.shape[0], c.n_kv_heads, c.head_dim)  # (T, Hkv, D)
        cache.update(k, v)
        return cache.attend(q, positions, c.attn_scale, self.window, self.backend)


class CausalLM:
    """Embedding, alternating segments and attention cores, final norm, output head."""

    HEAD_SLICE_ROWS = 8192  # load transients scale with a slice: 8192 rows keep peak RSS ~ held

    def __init__(self, f: GGUFFile, backend: Backend, cfg: ModelConfig, ffn=None,
                 head: bool = True, embed_rows=None):
        """ffn: None for the dense FFN inside the segments, or a callable
        (layer, h (T, d), gate (T, ffn)) -> (T, d) that runs the FFN outside them; the gate
        pre-activations come from the resident gate weight inside the segment.
        head=False leaves the output head out (the vocabulary lives on flash: vocab/), and
        `embed_rows` may then supply embedding rows (ids (T,) -> (T, d) float32)."""
        self.file, self.cfg, self.backend, self.ffn = f, cfg, backend, ffn
        self.embed_rows = embed_rows
        d, q_width = cfg.d_model, cfg.n_heads * cfg.head_dim
        n = cfg.n_layers
        rope_tables: dict = {}  # one per RoPE configuration, shared by the layers
        self.cores = [backend.make_attention_core(f, cfg, i)
                      or AttentionCore(f, cfg, i, backend, rope_tables) for i in range(n)]

        def compile_segment(fn, widths):
            seg = backend.compile(f, fn, widths)
            f.release_pages()  # the file's pages read for this segment leave our RSS now
            return seg

        self.first = compile_segment(lambda g, x: self.attention_inputs(g, x, 0), [d])
        if ffn is None:
            self.segments = [
                compile_segment(lambda g, x, a, i=i: self._segment(g, x, a, i), [d, q_width])
                for i in range(n)
            ]
        else:
            self.pre_ffn = [compile_segment(lambda g, x, a, i=i: self._pre_ffn(g, x, a, i),
                                            [d, q_width]) for i in range(n)]
            self.post_ffn = [compile_segment(lambda g, x, m, i=i: self._post_ffn(g, x, m, i),
                                             [d, d]) for i in range(n)]
        # The head is compiled in vocabulary slices: loading it whole needs several transient
        # copies of the largest tensor (Gemma 3: 1.4 GB peak RSS for a 253 MB file).
        rows = "output.weight" if "output.weight" in f.tensors else "token_embd.weight"
        bounds = list(range(0, cfg.vocab_size, self.HEAD_SLICE_ROWS)) + [cfg.vocab_size]
        self.head_slices = [] if not head else [
            compile_segment(lambda g, h, r=r: [g.linear(h, rows, rows=r)], [d])
            for r in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    # --- supplied by each architecture ------------------------------------------------------
    def attention_inputs(self, g: GraphBuilder, x, layer: int) -> list:
        """x (T, d) -> [q (T, H*D), k (T, Hkv*D), v (T, Hkv*D)] of `layer`."""
        raise NotImplementedError

    def attention_residual(self, g: GraphBuilder, x, attn, layer: int):
        """x + (the projected attention output, normed where the arch says)."""
        raise NotImplementedError

    def ffn_input(self, g: GraphBuilder, x, layer: int):
        """The FFN's input: the residual stream, normed."""
        raise NotImplementedError

    def feed_forward(self, g: GraphBuilder, h, layer: int):
        raise NotImplementedError

    def ffn_residual(self, g: GraphBuilder, x, m, layer: int):
        """x + (the FFN output m, normed where the arch says)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------
    def _next(self, g, x, layer):
        """After layer `layer`: the next layer's q/k/v, or the final norm."""
        if layer + 1 < self.cfg.n_layers:
            return [x, *self.attention_inputs(g, x, layer + 1)]
        return [g.rms_norm(x, "output_norm.weight", self.cfg.norm_eps)]

    def _segment(self, g, x, attn, layer):
        x = self.attention_residual(g, x, attn, layer)
        m = self.feed_forward(g, self.ffn_input(g, x, layer), layer)
        return self._next(g, self.ffn_residual(g, x, m, layer), layer)

    def _pre_ffn(self, g, x, attn, layer):
        x = self.attention_residual(g, x, attn, layer)
        h = self.ffn_input(g, x, layer)
        return [x, h, g.linear(h, f"blk.{layer}.ffn_gate.weight")]

    def _post_ffn(self, g, x, m, layer):
        return self._next(g, self.ffn_residual(g, x, m, layer), layer)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """(T,) token ids -> (T, d) rows read from the mapped file, scaled where the arch says."""
        if self.embed_rows is not None:
            x = self.embed_rows(ids)
        else:
            x = self.file.rows("token_embd.weight", ids)
        if self.cfg.embed_scale != 1.0:
            x = x * np.float32(self.cfg.embed_scale)
        return x

    def forward(self, ids: np.ndarray, caches: list[KVCache], stop_at: int | None = None):
        """Run ids (T,) after what the caches hold; returns final-normed hidden states (T, d).

        stop_at=r runs layers 0..r-1 only (their caches advance, the rest stay untouched) and
        returns layer r's projected (q, k, v) before its attention core (the token filter's
        pass 1; `cores[r].rotate` turns them into what attention would score)."""
        start = caches[0].offset
        positions = np.arange(start, start + len(ids))
        x = self.embed(np.asarray(ids, np.int64))
        q, k, v = self.first(x)
        for layer, (core, cache) in enumerate(zip(self.cores, caches, strict=True)):
            if layer == stop_at:
                return q, k, v
            attn = core(q, k, v, cache, positions)
            if self.ffn is None:
                outs = self.segments[layer](x, attn)
            else:
                x, h, gate = self.pre_ffn[layer](x, attn)
                outs = self.post_ffn[layer](x, self.ffn(layer, h, gate))
            if len(outs) == 1:
                return outs[0]
            x, q, k, v = outs
        raise AssertionError("unreachable: the last segment returns the final norm")

    def head(self, h: np.ndarray) -> np.ndarray:
        """(T, d) -> (T, vocab) float32 logits."""
        host = self.backend.to_host
        if len(self.head_slices) == 1:
            return host(self.head_slices[0](h)[0])
        return np.concatenate([host(s(h)[0]) for s in self.head_slices], axis=1)

    @property
    def nbytes(self) -> int:
        """Bytes of weights this model holds (backend storage + norms), not the mapped file."""
        segs = [self.first, *self.head_slices]
        segs += self.segments if self.ffn is None else [*self.pre_ffn, *self.post_ffn]
        return sum(s.nbytes for s in segs) + sum(
            (c.q_norm.nbytes + c.k_norm.nbytes) if c.q_norm is not None else 0
            for c in self.cores)
