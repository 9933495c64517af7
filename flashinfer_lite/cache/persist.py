"""Prompt caches on disk (Model.save_cache / load_cache).

Layout: MAGIC (8 bytes), version (u32 LE), header length (u64 LE), header (JSON: model identity,
cache spec, cached ids, one entry per array), the arrays' bytes back to back, then a SHA-256 of
everything before it. Written to a temporary name in the same directory and renamed, so a
reader never sees half a file. Every check failure raises CacheFileError naming the cause.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import CacheFileError
from .kv import KVCache, KVSpec

MAGIC = b"FLKVCACH"
VERSION = 1
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
_DIGEST = 32


def model_identity(f, cfg) -> dict:
    """What a cache depends on: the architecture, its dimensions, and a hash of the GGUF's
    header + metadata + tensor table (everything before the tensor data)."""
    end = int(getattr(f._reader, "data_offset", 0)) or min(f.file_size, 1 << 20)
    with open(f.path, "rb") as fh:
        digest = hashlib.sha256(fh.read(end)).hexdigest()
    return {"architecture": cfg.architecture, "n_layers": cfg.n_layers,
            "d_model": cfg.d_model, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size, "metadata_sha256": digest}


def save_prompt_cache(path, identity: dict, spec: KVSpec, ids: list[int],
                      caches: list[KVCache]) -> None:
    path = Path(path)
    entries, blobs, offset = [], [], 0
    for layer, cache in enumerate(caches):
        for name, arr in cache.state.items():
            arr = np.asarray(arr)
            arr = arr if arr.flags.c_contiguous else arr.copy()  # (ascontiguousarray: >= 1-d)
            entries.append({"layer": layer, "name": name, "dtype": arr.dtype.str,
                            "shape": list(arr.shape), "offset": offset, "nbytes": arr.nbytes})
            blobs.append(arr)
            offset += arr.nbytes
    header = json.dumps({"model": identity, "kv": asdict(spec), "ids": list(map(int, ids)),
                         "arrays": entries, "payload_bytes": offset}).encode()
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in [_PREFIX.pack(MAGIC, VERSION, len(header)), header,
                         *(b.reshape(-1).view(np.uint8) for b in blobs)]:
                h.update(part)
                out.write(part)
            out.write(h.digest())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_prompt_cache(path, identity: dict, spec: KVSpec, caches: list[KVCache]) -> list[int]:
    """Fill `caches` from the file; returns the cached ids."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CacheFileError(f"cannot read prompt cache {path}: {exc.strerror or exc}") from exc
    if len(data) < _PREFIX.size + _DIGEST or data[:8] != MAGIC:
        raise CacheFileError(f"{path} is not a flashinfer-lite prompt cache")
    _, version, header_len = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise CacheFileError(f"{path} is prompt cache version {version}; this build reads "
                             f"version {VERSION}")
    if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:]:
        raise CacheFileError(f"{path} is corrupt or truncated (checksum mismatch)")
    start = _PREFIX.size
    try:
        header = json.loads(data[start : start + header_len])
    except ValueError as exc:
        raise CacheFileError(f"{path} has a damaged header") from exc
    if header["model"] != identity:
        theirs, ours = header["model"], identity
        diff = [k for k in ours if theirs.get(k) != ours[k]]
        raise CacheFileError(
            f"{path} was made by another model ({theirs.get('architecture')}, "
            f"{theirs.get('n_layers')} layers; differs in {', '.join(diff)})")
    if header["kv"] != asdict(spec):
        raise CacheFileError(f"{path} holds a {header['kv']} cache; this model uses "
                             f"{asdict(spec)}")
    payload = start + header_len
    if payload + header["payload_bytes"] + _DIGEST != len(data):
        raise CacheFileError(f"{path} is truncated")
    states: list[dict] = [{} for _ in caches]
    for e in header["arrays"]:
        a = payload + e["offset"]
        arr = np.frombuffer(data, np.dtype(e["dtype"]), count=int(np.prod(e["shape"])),
                            offset=a).reshape(e["shape"])
        states[e["layer"]][e["name"]] = arr.copy()
    for cache, state in zip(caches, states, strict=True):
        cache.state = state
    return header["ids"]
