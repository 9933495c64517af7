"""llama.cpp's tokenizer, loaded from the GGUF with `Llama(path, vocab_only=True)` (0.06 s)."""

from __future__ import annotations

import codecs
import contextlib
import os
from pathlib import Path

from .errors import InvalidModelFileError


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp prints its loader log on fd 2 even with verbose=False; hide it."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)
        os.close(devnull)


class Tokenizer:
    def __init__(self, path: Path):
        from llama_cpp import Llama

        try:
            with _quiet_stderr():
                self._llama = Llama(model_path=str(path), vocab_only=True, verbose=False)
        except Exception as exc:  # llama.cpp raises ValueError with little detail
            raise InvalidModelFileError(f"llama.cpp could not load the tokenizer of {path}: "
                                        f"{exc}") from exc
        self.bos_id = self._llama.token_bos()
        self.eos_id = self._llama.token_eos()
        self.n_vocab = self._llama.n_vocab()
        self._eog = None

    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """Text -> ids; special tokens written in the text (<|im_start|>) parse as one id,
        like llama.cpp's own prompt handling."""
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def decode(self, ids, special: bool = False) -> str:
        return self.piece_bytes(ids, special).decode("utf-8", errors="replace")

    def piece_bytes(self, ids, special: bool = False) -> bytes:
        return self._llama.detokenize(list(ids), special=special)

    def token_text(self, token: int) -> str:
        return self.piece_bytes([token], special=True).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """End of generation: EOS, or an end-of-turn token like <end_of_turn> / <|im_end|>."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._llama._model.vocab, int(token)))

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Token ids in, text out as soon as it is complete UTF-8 (a character may span tokens)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        data = self.tok.piece_bytes([token])
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
