"""What the architectures share: embeddings, the segment plan, the caches, the head.

A forward pass alternates two kinds of work per layer (see kernels/base.py):
  segment i  (backend): o-projection of layer i-1, residuals, norms, FFN, q/k/v of layer i
  core i     (kernels/attention.py): q/k norms, RoPE, KV cache, softmax attention of layer i
An architecture supplies the pieces (attention_inputs, attention_residual, ffn_input,
feed_forward, ffn_residual) as builder functions.

With an external FFN (flash-resident weights, or a recording one for calibration), each segment
splits in two around it: [o-projection, residual, FFN norm] -> FFN(h) -> [residual, q/k/v].
"""

from __future__ import annotations

import numpy as np

from ..cache.base import KVCache
from ..cache.kv import KVSpec
from ..kernels.attention import AttentionCore, RopeTable
from ..kernels.base import Backend, GraphBuilder
from ..loaders.gguf_file import GGUFFile

__all__ = ["AttentionCore", "CausalLM", "RopeTable"]


class CausalLM:
    """Embedding, alternating segments and attention cores, final norm, output head."""

    HEAD_SLICE_ROWS = 8192  # load transients scale with a slice: 8192 rows keep peak RSS ~ held

    def __init__(self, f: GGUFFile, backend: Backend, cfg, ffn=None, head: bool = True,
                 embed_rows=None):
        """cfg: the model's config.ModelConfig. ffn: None for the dense FFN inside the
        segments, or a callable (layer, h (T, d)) -> (T, d) that runs the whole FFN, gate
        included, outside them (the FFN on flash; calibration's recording FFN).
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
        rows = f.head_tensor
        bounds = list(range(0, cfg.vocab_size, self.HEAD_SLICE_ROWS)) + [cfg.vocab_size]
        self.head_slices = [] if not head else [
            compile_segment(lambda g, h, r=r: [g.linear(h, rows, rows=r)], [d])
            for r in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    # --- supplied by each architecture ------------------------------------------------------
    @classmethod
    def config_fields(cls, f, fields: dict) -> dict:
        """The config's fields as read from a GGUF's common metadata (config.py) -> with this
        architecture's own (its sliding windows, RoPE bases, embedding scale, ...)."""
        return fields

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

    def make_cache(self, spec: KVSpec) -> list[KVCache]:
        """A KV cache per layer of the kind `spec` asks for, laid out as this architecture
        attends: a sliding-window layer keeps its window, a bounded cache re-rotates its sinks
        with the layer's RoPE (mlx-lm's make_prompt_cache)."""
        c = self.cfg
        return self.backend.make_kv_caches(spec, c.n_layers, c.n_kv_heads, c.head_dim,
                                           sliding_windows=[core.window for core in self.cores],
                                           rope_shifts=[core.shift_keys for core in self.cores])

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
        return [x, self.ffn_input(g, x, layer)]

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
        return self.forward_embedded(self.embed(np.asarray(ids, np.int64)), caches, stop_at)

    def forward_embedded(self, x, caches: list[KVCache], stop_at: int | None = None):
        """forward() from embedded rows x (T, d), which may live on the backend's device (a
        pipelined decode embeds its token there, kernels/mlx_decode.py)."""
        start = caches[0].offset
        positions = np.arange(start, start + x.shape[0])
        q, k, v = self.first(x)
        for layer, (core, cache) in enumerate(zip(self.cores, caches, strict=True)):
            if layer == stop_at:
                return q, k, v
            attn = core(q, k, v, cache, positions)
            if self.ffn is None:
                outs = self.segments[layer](x, attn)
            else:
                x, h = self.pre_ffn[layer](x, attn)
                outs = self.post_ffn[layer](x, self.ffn(layer, h))
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
