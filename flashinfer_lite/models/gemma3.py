"""Gemma 3: embeddings scaled by sqrt(d), q/k RMSNorm, a norm after attention and after the FFN
as well as before, GeGLU (tanh GELU), 5 sliding-window layers (RoPE base 1e4) per global one.

The GGUF's norm weights already include Gemma's "+1" (llama.cpp's converter adds it), so plain
RMSNorm applies; the attention core (kernels/attention.py) applies the q/k norms and the
sliding window, which `config_fields` sets.
"""

from __future__ import annotations

import math

from .llama import LlamaModel


class Gemma3Model(LlamaModel):
    @classmethod
    def config_fields(cls, f, fields: dict) -> dict:
        # Every 6th layer attends globally (RoPE base from metadata, 1e6); the others slide
        # over `sliding_window` tokens with RoPE base 1e4, which llama.cpp hard-codes.
        return {**fields,
                "sliding_window": int(f.arch_key("attention.sliding_window", 512)),
                "global_layers": frozenset(i for i in range(fields["n_layers"])
                                           if (i + 1) % 6 == 0),
                "rope_base_local": 10000.0,
                "embed_scale": math.sqrt(fields["d_model"]),
                "activation": "gelu_tanh",
                "norm_eps": float(f.arch_key("attention.layer_norm_rms_epsilon", 1e-6))}

    def attention_residual(self, g, x, attn, layer):
        p = f"blk.{layer}."
        a = g.linear(attn, p + "attn_output.weight")
        return g.add(x, g.rms_norm(a, p + "post_attention_norm.weight", self.cfg.norm_eps))

    def ffn_residual(self, g, x, m, layer):
        p = f"blk.{layer}."
        return g.add(x, g.rms_norm(m, p + "post_ffw_norm.weight", self.cfg.norm_eps))
