"""The llama family (Llama, Mistral, Qwen2/3, SmolLM2): pre-norm blocks, SwiGLU FFN, optional
q/k/v biases (Qwen2) and q/k norms (Qwen3)."""

from __future__ import annotations

from .common import CausalLM


class LlamaModel(CausalLM):
    def _bias(self, name: str) -> str | None:
        return name if name in self.file.tensors else None

    def attention_inputs(self, g, x, layer):
        p = f"blk.{layer}."
        h = g.rms_norm(x, p + "attn_norm.weight", self.cfg.norm_eps)
        return [g.linear(h, p + f"attn_{w}.weight", self._bias(p + f"attn_{w}.bias"))
                for w in ("q", "k", "v")]

    def attention_residual(self, g, x, attn, layer):
        return g.add(x, g.linear(attn, f"blk.{layer}.attn_output.weight"))

    def ffn_input(self, g, x, layer):
        return g.rms_norm(x, f"blk.{layer}.ffn_norm.weight", self.cfg.norm_eps)

    def feed_forward(self, g, h, layer):
        p = f"blk.{layer}."
        gate = g.activation(g.linear(h, p + "ffn_gate.weight"), self.cfg.activation)
        return g.linear(g.mul(gate, g.linear(h, p + "ffn_up.weight")), p + "ffn_down.weight")

    def ffn_residual(self, g, x, m, layer):
        return g.add(x, m)
