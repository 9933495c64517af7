"""Pieces shared by the architectures: attention with RoPE and a KV cache, embeddings, the head."""

from __future__ import annotations

import numpy as np

from ..cache.kv import KVCache
from ..config import ModelConfig
from ..kernels.base import Backend
from ..kernels.ops import apply_rope, attention, rms_norm, rope_tables
from ..loaders.gguf_file import GGUFFile


def optional_dense(f: GGUFFile, name: str) -> np.ndarray | None:
    return f.dense(name) if name in f.tensors else None


class Attention:
    """Grouped-query attention of one layer: projections, optional q/k RMSNorm, RoPE, cache."""

    def __init__(self, f: GGUFFile, backend: Backend, cfg: ModelConfig, layer: int):
        p = f"blk.{layer}."
        self.cfg = cfg
        names = [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"]
        biases = [optional_dense(f, n.replace(".weight", ".bias")) for n in names]
        self.qkv = backend.linear(f, names, biases)
        self.o = backend.linear(f, [p + "attn_output.weight"])
        self.q_norm = optional_dense(f, p + "attn_q_norm.weight")
        self.k_norm = optional_dense(f, p + "attn_k_norm.weight")
        sliding = cfg.is_sliding(layer)
        self.window = cfg.sliding_window if sliding else None
        self.rope_base = cfg.rope_base_local if sliding and cfg.rope_base_local else cfg.rope_base
        # Linear RoPE scaling applies to the global layers only (llama.cpp: freq_scale_swa = 1).
        self.rope_scale = 1.0 if sliding else cfg.rope_scale
        self.freq_factors = optional_dense(f, "rope_freqs.weight")  # Llama 3.1 long-context

    def __call__(self, x: np.ndarray, cache: KVCache, positions: np.ndarray) -> np.ndarray:
        c = self.cfg
        t = x.shape[0]
        q, k, v = self.qkv(x)
        q = q.reshape(t, c.n_heads, c.head_dim)  # (T, H, D)
        k = k.reshape(t, c.n_kv_heads, c.head_dim)  # (T, Hkv, D)
        v = v.reshape(t, c.n_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, c.norm_eps)
            k = rms_norm(k, self.k_norm, c.norm_eps)
        cos, sin = rope_tables(positions, c.head_dim, self.rope_base, self.rope_scale,
                               self.freq_factors)
        q = apply_rope(q, cos, sin, c.rope_type)
        k = apply_rope(k, cos, sin, c.rope_type)
        start = cache.offset
        keys, values = cache.update_and_fetch(k, v)  # (Hkv, S, D)
        k_pos = np.arange(keys.shape[1])
        if self.window is not None and start > self.window:
            # Keys older than the window are invisible to every query of this chunk: skip them.
            first = max(0, start - self.window + 1)
            keys, values, k_pos = keys[:, first:], values[:, first:], k_pos[first:]
        out = attention(q, keys, values, positions, k_pos, c.attn_scale, self.window)
        return self.o(out)[0]

    @property
    def nbytes(self) -> int:
        return self.qkv.nbytes + self.o.nbytes


class CausalLM:
    """Embedding, a stack of blocks (defined by each architecture), final norm, output head."""

    def __init__(self, f: GGUFFile, backend: Backend, cfg: ModelConfig):
        self.file, self.cfg, self.backend = f, cfg, backend
        self.final_norm = f.dense("output_norm.weight")
        head = "output.weight" if "output.weight" in f.tensors else "token_embd.weight"
        self.head_linear = backend.linear(f, [head])
        self.blocks = [self.make_block(f, backend, cfg, i) for i in range(cfg.n_layers)]

    def make_block(self, f, backend, cfg, layer):
        raise NotImplementedError

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """(T,) token ids -> (T, d) rows read from the mapped file, scaled where the arch says."""
        x = self.file.rows("token_embd.weight", ids)
        if self.cfg.embed_scale != 1.0:
            x = x * np.float32(self.cfg.embed_scale)
        return x

    def forward(self, ids: np.ndarray, caches: list[KVCache]) -> np.ndarray:
        """Run ids (T,) after what the caches hold; returns final-normed hidden states (T, d)."""
        start = caches[0].offset
        positions = np.arange(start, start + len(ids))
        x = self.embed(np.asarray(ids, np.int64))
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block(x, cache, positions)
        return rms_norm(x, self.final_norm, self.cfg.norm_eps)

    def head(self, h: np.ndarray) -> np.ndarray:
        """(T, d) -> (T, vocab) float32 logits."""
        return self.head_linear(h)[0]

    @property
    def nbytes(self) -> int:
        """Bytes of weights this model holds (backend storage + norms), not the mapped file."""
        total = self.head_linear.nbytes + self.final_norm.nbytes
        return total + sum(b.nbytes for b in self.blocks)
