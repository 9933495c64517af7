"""One module per architecture; `ARCHITECTURES` maps a GGUF's general.architecture to the class
that runs it and the RoPE layout llama.cpp uses for it ("norm" rotates adjacent pairs: the
converter permuted Q/K into Meta's layout; "neox" rotates the two halves)."""

from __future__ import annotations

from .common import CausalLM
from .gemma3 import Gemma3Model
from .llama import LlamaModel

ARCHITECTURES: dict[str, tuple[type[CausalLM], str]] = {
    "llama": (LlamaModel, "norm"), "mistral": (LlamaModel, "norm"),
    "qwen2": (LlamaModel, "neox"), "qwen3": (LlamaModel, "neox"),
    "gemma3": (Gemma3Model, "neox"),
}


def model_class(cfg) -> type[CausalLM]:
    return ARCHITECTURES[cfg.architecture][0]


def build_model(f, backend, cfg, ffn=None, head=True, embed_rows=None) -> CausalLM:
    return model_class(cfg)(f, backend, cfg, ffn=ffn, head=head, embed_rows=embed_rows)
