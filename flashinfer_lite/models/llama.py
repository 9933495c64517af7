"""The llama family (Llama, Mistral, Qwen2/3, SmolLM2): pre-norm blocks, SwiGLU FFN."""

from __future__ import annotations

from ..kernels.ops import rms_norm
from .common import Attention, CausalLM


class LlamaBlock:
    def __init__(self, f, backend, cfg, layer):
        p = f"blk.{layer}."
        self.eps = cfg.norm_eps
        self.attn_norm = f.dense(p + "attn_norm.weight")
        self.ffn_norm = f.dense(p + "ffn_norm.weight")
        self.attn = Attention(f, backend, cfg, layer)
        self.ffn = backend.feed_forward(f, p + "ffn_gate.weight", p + "ffn_up.weight",
                                        p + "ffn_down.weight", cfg.activation)

    def __call__(self, x, cache, positions):
        x = x + self.attn(rms_norm(x, self.attn_norm, self.eps), cache, positions)
        return x + self.ffn(rms_norm(x, self.ffn_norm, self.eps))

    @property
    def nbytes(self):
        return self.attn.nbytes + self.ffn.nbytes + self.attn_norm.nbytes + self.ffn_norm.nbytes


class LlamaModel(CausalLM):
    def make_block(self, f, backend, cfg, layer):
        return LlamaBlock(f, backend, cfg, layer)
