"""llama.cpp's tokenizer, loaded from the GGUF with `Llama(path, vocab_only=True)` (0.06 s)."""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import threading
from array import array
from collections import OrderedDict
from pathlib import Path

from .errors import InvalidModelFileError


@contextlib.contextmanager
def quiet_stderr():
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
        # imported here, not with this module: it loads llama.cpp's shared library, which only
        # a process that builds a tokenizer needs
        import llama_cpp

        try:
            with quiet_stderr():
                self._llama = llama_cpp.Llama(model_path=str(path), vocab_only=True,
                                              verbose=False)
        except Exception as exc:  # llama.cpp raises ValueError with little detail
            raise InvalidModelFileError(f"llama.cpp could not load the tokenizer of {path}: "
                                        f"{exc}") from exc
        self.bos_id = self._llama.token_bos()
        self.eos_id = self._llama.token_eos()
        self.n_vocab = self._llama.n_vocab()
        self._vocab_is_eog = llama_cpp.llama_vocab_is_eog
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
        return bool(self._vocab_is_eog(self._llama._model.vocab, int(token)))

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


class SegmentedEncoder:
    """Tokenizes chat transcripts piece by piece, so a new turn costs its new text only.

    The text is split at its special-token markers (<|im_start|>, <end_of_turn>, ...); each
    piece between two markers is tokenized once and remembered (least recently used first
    out, up to max_chars of text), each marker is its one id. llama.cpp itself splits a
    prompt at special tokens and tokenizes the raw pieces separately, so this gives its ids;
    `exact` checks that once on probe texts (markers with spaces and newlines around them),
    and where it fails (a token that strips the whitespace beside it, say) every call
    tokenizes the whole text.

    Measured (SmolLM2, a 2,000-token history): the whole transcript took 14-21 ms of CPU
    per turn before (llama.cpp's BPE); render + pieces 0.3-0.6 ms from the second turn on.
    """

    def __init__(self, tok: Tokenizer, markers, max_chars: int = 1 << 20):
        self.tok = tok
        ids = {m: tok.encode(m, add_bos=False) for m in markers}
        self.marker_ids = {m: i[0] for m, i in ids.items() if len(i) == 1}
        # longest first, so a marker that starts another one does not cut it
        alternatives = sorted(self.marker_ids, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")").split \
            if alternatives else None
        # piece text -> its ids (4 bytes each), at most max_chars of text remembered
        self._pieces: OrderedDict[str, array] = OrderedDict()
        self.max_chars, self._chars = max_chars, 0
        self._lock = threading.Lock()  # a Model's chats may come from several threads
        # what add_bos=True puts first: llama.cpp adds BOS only where the vocabulary says so
        self._bos = tok.encode("", add_bos=True)
        self.exact = self._split is not None and all(
            self._encode(t, add_bos) == tok.encode(t, add_bos=add_bos)
            for t in self._probes() for add_bos in (True, False))
        self._pieces.clear()
        self._chars = 0

    def _probes(self) -> list[str]:
        out = []
        for m in self.marker_ids:
            out += [f"{m}user\nHi{m}\n", f"a {m} b", f" {m}  \n\n x\n{m}{m}", f"\n{m}"]
        return out

    def _piece(self, text: str) -> array:
        with self._lock:
            ids = self._pieces.get(text)
            if ids is not None:
                self._pieces.move_to_end(text)
                return ids
        ids = array("i", self.tok.encode(text, add_bos=False))
        if len(text) <= self.max_chars:
            with self._lock:
                if text not in self._pieces:
                    self._pieces[text] = ids
                    self._chars += len(text)
                while self._chars > self.max_chars:
                    old, _ = self._pieces.popitem(last=False)
                    self._chars -= len(old)
        return ids

    def _encode(self, text: str, add_bos: bool) -> list[int]:
        out = list(self._bos) if add_bos else []
        for piece in self._split(text):
            if piece in self.marker_ids:
                out.append(self.marker_ids[piece])
            elif piece:
                out.extend(self._piece(piece))
        return out

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not self.exact:
            return self.tok.encode(text, add_bos=add_bos)
        return self._encode(text, add_bos)
