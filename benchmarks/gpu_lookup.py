"""Token ids prepared on a machine with llama.cpp (our tokenizer), served on a GPU machine without
it: the lookup tokenizer that bench_mlx.py and bench_gemfilter_mlx.py install there.

A table (a dict, saved as JSON by the scripts' `prepare`) may hold:
- "encode": {key(text, add_bos): ids} for texts the run tokenizes verbatim;
- "topics_tail": {n_chars: packed ids} for the last n_chars of `evaluation.topics_text()` (the
  flash calibration text and the vocabulary's token order). They are served for any text that
  is the last n_chars of the run machine's own topics text, so a run does not depend on its
  Python version (pydoc's topics differ between versions): the ids are prepare's;
- "token_text", "eog": the text of the tokens a run decodes, and the end-of-generation ids.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import zlib

import numpy as np


def text_key(text: str, add_bos: bool) -> str:
    return hashlib.sha256(f"{int(add_bos)}:{text}".encode()).hexdigest()


def pack_ids(ids) -> str:
    """Token ids -> a short string (int32, zlib, base64): 100k ids in ~200 KB of JSON."""
    return base64.b64encode(zlib.compress(np.asarray(ids, np.int32).tobytes(), 9)).decode()


def unpack_ids(s: str) -> list[int]:
    return np.frombuffer(zlib.decompress(base64.b64decode(s)), np.int32).tolist()


class LookupTokenizer:
    """Serves a prepared table; decodes to no text (the runs score text on the first machine)."""

    def __init__(self, table: dict):
        self.table = table
        self.bos_id, self.eos_id, self.n_vocab = table["bos_id"], table["eos_id"], table["n_vocab"]
        self._eog = set(table.get("eog", [table["eos_id"]]))

    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        from flashinfer_lite.evaluation import topics_text

        key = text_key(text, add_bos)
        if key in self.table.get("encode", {}):
            return list(self.table["encode"][key])
        tails = self.table.get("topics_tail", {})
        if not add_bos and str(len(text)) in tails and topics_text().endswith(text):
            return unpack_ids(tails[str(len(text))])
        raise KeyError(f"no prepared ids for a text of {len(text)} characters "
                       f"({text[:40]!r}...): rerun `prepare` (with --force) where llama.cpp is")

    def token_text(self, token: int) -> str:
        return self.table.get("token_text", {}).get(str(int(token)), "")

    def piece_bytes(self, ids, special: bool = False) -> bytes:
        return b""

    def decode(self, ids, special: bool = False) -> str:
        return ""

    def is_eog(self, token: int) -> bool:
        return int(token) in self._eog

    def stream_decoder(self):
        from flashinfer_lite.tokenizer import StreamDecoder

        return StreamDecoder(self)


def install_lookup_tokenizer(table: dict) -> list[str]:
    """Every loaded flashinfer_lite module's `Tokenizer` becomes one serving `table` (the
    loader, the flash calibration, ...); returns the modules patched."""
    import flashinfer_lite.loading  # noqa: F401  (imports every module that builds a Tokenizer)
    import flashinfer_lite.tokenizer

    real = flashinfer_lite.tokenizer.Tokenizer
    cls = type("LookupTokenizerFor", (LookupTokenizer,),
               {"__init__": lambda self, path: LookupTokenizer.__init__(self, table)})
    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("flashinfer_lite") and getattr(module, "Tokenizer", None) is real:
            module.Tokenizer = cls
            patched.append(name)
    return patched
