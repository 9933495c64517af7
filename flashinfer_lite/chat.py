"""Chats to token ids: the model's chat template rendered, then tokenized a piece between
special tokens at a time (SegmentedEncoder), so each turn tokenizes only its new text."""

from __future__ import annotations

import functools

import numpy as np

from .chat_template import FALLBACK_TEMPLATES, ChatTemplate
from .loaders.gguf_file import GGUFFile
from .tokenizer import SegmentedEncoder, Tokenizer

CONTROL_TOKEN = 3  # tokenizer.ggml.token_type of control tokens (<bos>, <start_of_turn>, ...)


def control_token_mask(f: GGUFFile, vocab_size: int) -> np.ndarray:
    """(vocab,) bool: the vocabulary's control tokens, from the GGUF's token types."""
    kinds = np.asarray(f.get("tokenizer.ggml.token_type", []), np.int64)
    is_control = np.zeros(vocab_size, bool)
    is_control[: len(kinds)] = kinds[:vocab_size] == CONTROL_TOKEN
    return is_control


class ChatFormat:
    """One model's chat template with its tokenizer."""

    def __init__(self, f: GGUFFile, architecture: str, vocab_size: int, tokenizer: Tokenizer):
        source = f.get("tokenizer.chat_template")
        self.template = ChatTemplate.for_model(source, architecture)
        # the file's own template, or one known for the architecture (not the generic ChatML
        # fallback, which a base model was never trained on)
        self.native = bool(source) or architecture in FALLBACK_TEMPLATES
        self.file, self.vocab_size, self.tokenizer = f, vocab_size, tokenizer

    @functools.cached_property
    def control_tokens(self) -> np.ndarray:
        """(vocab,) bool: the control tokens (<bos>, <start_of_turn>, ...), read once from the
        GGUF's token types (262k of them for Gemma 3)."""
        return control_token_mask(self.file, self.vocab_size)

    @functools.cached_property
    def encoder(self) -> SegmentedEncoder:
        """Splits rendered chats at the template's special tokens and remembers the pieces."""
        tok, is_control = self.tokenizer, self.control_tokens
        probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                 {"role": "user", "content": "c"}]
        try:
            text = self.template.render(probe, bos_token="", eos_token="",
                                        add_generation_prompt=True)
        except Exception:  # a template that wants something else: no markers
            text = ""
        markers = {tok.token_text(i) for i in tok.encode(text, add_bos=False)
                   if i < len(is_control) and is_control[i]}
        return SegmentedEncoder(tok, sorted(markers))

    def encode(self, messages, add_generation_prompt: bool = True) -> list[int]:
        tok = self.tokenizer
        bos = tok.token_text(tok.bos_id) if tok.bos_id >= 0 else ""
        text = self.template.render(messages, bos_token=bos,
                                    eos_token=tok.token_text(tok.eos_id),
                                    add_generation_prompt=add_generation_prompt)
        # A template that writes BOS itself (Gemma's) must not get a second one.
        add_bos = not (bos and text.startswith(bos))
        return self.encoder.encode(text, add_bos=add_bos)
