"""One module per architecture; `build_model` picks by the GGUF's general.architecture."""

from __future__ import annotations


def model_class(cfg):
    if cfg.architecture == "gemma3":
        from .gemma3 import Gemma3Model

        return Gemma3Model
    from .llama import LlamaModel

    return LlamaModel


def build_model(f, backend, cfg, ffn=None, head=True, embed_rows=None):
    return model_class(cfg)(f, backend, cfg, ffn=ffn, head=head, embed_rows=embed_rows)
