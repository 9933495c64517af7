"""Gemma 3: embeddings scaled by sqrt(d), q/k RMSNorm, a norm after attention and after the FFN
as well as before, GeGLU (tanh GELU), 5 sliding-window layers (RoPE base 1e4) per global one.

The GGUF's norm weights already include Gemma's "+1" (llama.cpp's converter adds it), so plain
RMSNorm applies; the config (config.py) sets the window, RoPE bases and embedding scale.
"""

from __future__ import annotations

from ..kernels.ops import rms_norm
from .common import Attention, CausalLM


class Gemma3Block:
    def __init__(self, f, backend, cfg, layer):
        p = f"blk.{layer}."
        self.eps = cfg.norm_eps
        self.norms = {k: f.dense(p + k + ".weight") for k in
                      ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm")}
        self.attn = Attention(f, backend, cfg, layer)
        self.ffn = backend.feed_forward(f, p + "ffn_gate.weight", p + "ffn_up.weight",
                                        p + "ffn_down.weight", cfg.activation)

    def __call__(self, x, cache, positions):
        n, eps = self.norms, self.eps
        a = self.attn(rms_norm(x, n["attn_norm"], eps), cache, positions)
        x = x + rms_norm(a, n["post_attention_norm"], eps)
        m = self.ffn(rms_norm(x, n["ffn_norm"], eps))
        return x + rms_norm(m, n["post_ffw_norm"], eps)

    @property
    def nbytes(self):
        return self.attn.nbytes + self.ffn.nbytes + sum(w.nbytes for w in self.norms.values())


class Gemma3Model(CausalLM):
    def make_block(self, f, backend, cfg, layer):
        return Gemma3Block(f, backend, cfg, layer)
