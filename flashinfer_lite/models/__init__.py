"""One module per architecture; `build_model` picks by the GGUF's general.architecture."""

from __future__ import annotations


def build_model(f, backend, cfg):
    if cfg.architecture == "gemma3":
        from .gemma3 import Gemma3Model

        return Gemma3Model(f, backend, cfg)
    from .llama import LlamaModel

    return LlamaModel(f, backend, cfg)
