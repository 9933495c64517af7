"""Gemma 3: embeddings scaled by sqrt(d), q/k RMSNorm, a norm after attention and after the FFN
as well as before, GeGLU (tanh GELU), 5 sliding-window layers (RoPE base 1e4) per global one.

The GGUF's norm weights already include Gemma's "+1" (llama.cpp's converter adds it), so plain
RMSNorm applies; config.py sets the window, RoPE bases and embedding scale; the attention core
(common.py) applies the q/k norms.
"""

from __future__ import annotations

from .llama import LlamaModel


class Gemma3Model(LlamaModel):
    def attention_residual(self, g, x, attn, layer):
        p = f"blk.{layer}."
        a = g.linear(attn, p + "attn_output.weight")
        return g.add(x, g.rms_norm(a, p + "post_attention_norm.weight", self.cfg.norm_eps))

    def ffn_residual(self, g, x, m, layer):
        p = f"blk.{layer}."
        return g.add(x, g.rms_norm(m, p + "post_ffw_norm.weight", self.cfg.norm_eps))
