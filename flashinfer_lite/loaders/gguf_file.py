"""A GGUF file opened with the `gguf` package: memory-mapped, validated, errors made specific.

Tensors stay views into the mapped file until a backend asks for them, so opening a model costs
almost nothing and a row of the embedding can be read without touching the rest.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from ..errors import InvalidModelFileError, ModelNotFoundError, UnsupportedModelError
from ..memory import release_mapped_pages
from .quant_grid import SUPPORTED_TYPES

GGUF_MAGIC = b"GGUF"


class _PlainViewReader(GGUFReader):
    """GGUFReader whose field views are plain ndarrays over the same mapping.

    GGUFReader slices an np.memmap once per metadata part; np.memmap's __array_finalize__ makes
    that cost 22 s for Gemma 3's 262k-token vocabulary. Slicing a plain ndarray view of the same
    mapped bytes is ~10x cheaper and returns the same data (still no copy of the file).
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        end = offset + np.dtype(dtype).itemsize * count
        arr = plain[offset:end].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None
                                               else override_order))

    def _get_field_parts(self, orig_offs, raw_type):
        """Arrays as one view: scalars as one typed array, strings as one byte blob.

        The parent builds a view (and enum) per element, ~1M for Gemma 3's vocabulary (seconds);
        we walk string length prefixes with struct and keep one view; `_field_value` decodes it.
        """
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order == "S":
            return super()._get_field_parts(orig_offs, raw_type)
        item_type = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        scalar = self.gguf_scalar_to_np.get(GGUFValueType(int(item_type[0])))
        if scalar is not None:  # one view for the whole array, not one per element
            values = self._get(orig_offs + 12, scalar, int(count[0]))
            size = 12 + int(values.nbytes)
            return size, [item_type, count, values], [2], [GGUFValueType.ARRAY,
                                                            GGUFValueType(int(item_type[0]))]
        if GGUFValueType(int(item_type[0])) != GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        buf = self.__dict__["_plain"]
        start = offs = orig_offs + 12
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(int(count[0])):
            offs += 8 + unpack(buf, offs)[0]
        blob = buf[start:offs]
        size = 12 + (offs - start)
        return size, [item_type, count, blob], [], [GGUFValueType.ARRAY, GGUFValueType.STRING]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # row-major, numpy order: (rows, columns) for a matrix
    raw: np.ndarray  # the bytes (or floats) as the reader maps them
    nbytes: int


class GGUFFile:
    """Metadata and tensors of one GGUF file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise ModelNotFoundError(f"model file not found: {self.path}")
        if self.path.is_dir():
            raise InvalidModelFileError(f"{self.path} is a directory, not a GGUF file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise InvalidModelFileError(
                f"{self.path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')"
            )
        try:
            self._reader = _PlainViewReader(self.path, "r")
        except Exception as exc:  # gguf raises ValueError/IndexError/struct errors on damage
            raise InvalidModelFileError(
                f"{self.path} is damaged or truncated: {type(exc).__name__}: {exc}"
            ) from exc
        self.file_size = self.path.stat().st_size
        self.tensors: dict[str, TensorInfo] = {}
        self._offsets: dict[str, int] = {}  # each tensor's first byte in the file
        self._rows_fd: int | None = None  # opened on the first rows() call
        for t in self._reader.tensors:
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists ne0 first
            qtype = GGMLQuantizationType(int(t.tensor_type))
            end = int(t.data_offset) + int(t.n_bytes)
            if end > self.file_size:
                raise InvalidModelFileError(
                    f"{self.path} is truncated: tensor {t.name!r} ends at byte {end}, "
                    f"the file has {self.file_size}"
                )
            self.tensors[t.name] = TensorInfo(t.name, qtype, shape, t.data, int(t.n_bytes))
            self._offsets[t.name] = int(t.data_offset)
        self._fields = self._reader.fields
        self._values: dict[str, object] = {}  # converted lazily: token lists are 262k strings
        self.architecture = str(self.get("general.architecture", ""))
        if not self.architecture:
            raise InvalidModelFileError(f"{self.path} has no general.architecture key")

    def get(self, key: str, default=None):
        if key not in self._values:
            field = self._fields.get(key)
            if field is None:
                return default
            self._values[key] = _field_value(field)
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._fields)

    def arch_key(self, suffix: str, default=None):
        """`{architecture}.{suffix}`, the way llama.cpp names per-architecture keys."""
        return self.get(f"{self.architecture}.{suffix}", default)

    @property
    def head_tensor(self) -> str:
        """The output head's rows: its own tensor, or the token embedding when tied."""
        return "output.weight" if "output.weight" in self.tensors else "token_embd.weight"

    def tensor(self, name: str) -> TensorInfo:
        try:
            t = self.tensors[name]
        except KeyError:
            raise InvalidModelFileError(
                f"{self.path.name} has no tensor {name!r} (needed by {self.architecture})"
            ) from None
        if t.qtype not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"tensor {name!r} uses quant type {t.qtype.name}, which flashinfer-lite does not "
                f"support (supported: {', '.join(sorted(q.name for q in SUPPORTED_TYPES))})"
            )
        return t

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of a 2-D tensor dequantized to float32 (n, columns): for embeddings.

        Read with pread, not through the mapping: a page fault on a file mapping maps the
        pages around it too (fault-around, 64 KiB), and they stay in this process's RSS. On
        the 1.5B a 1.6k-token prompt's embedding rows (864 B each) left 79 MB of the mapped
        file resident, past a memory budget that had counted 1.4 MB of rows."""
        t = self.tensor(name)
        ids = np.asarray(ids, np.int64).reshape(-1)
        uniq, inverse = np.unique(ids, return_inverse=True)
        row_bytes = t.nbytes // t.shape[0]
        raw = np.empty((len(uniq), row_bytes), np.uint8)
        # one read per run of consecutive rows
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        starts, ends = np.r_[0, breaks], np.r_[breaks, len(uniq)]
        base = self._offsets[name]
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            view = memoryview(raw[a:b].reshape(-1))
            got = os.preadv(self._fd(), [view], base + int(uniq[a]) * row_bytes)
            if got != len(view):
                raise InvalidModelFileError(f"{self.path} is truncated inside {name!r}")
        if t.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            out = raw.view(t.raw.dtype).astype(np.float32)
        else:
            out = dequantize(raw, t.qtype).astype(np.float32, copy=False)
        return out.reshape(len(uniq), -1)[inverse]

    def _fd(self) -> int:
        if self._rows_fd is None:
            self._rows_fd = os.open(self.path, os.O_RDONLY)
        return self._rows_fd

    def dense(self, name: str) -> np.ndarray:
        """A whole tensor as float32 in numpy order (for norms and the reference path)."""
        t = self.tensor(name)
        if t.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            return np.asarray(t.raw, dtype=np.float32).reshape(t.shape)
        return dequantize(t.raw, t.qtype).astype(np.float32, copy=False).reshape(t.shape)

    def bytes_by_group(self) -> dict[str, int]:
        """File bytes of tensors grouped as embedding / attention / ffn / norm / output / other."""
        groups: dict[str, int] = {}
        for name, t in self.tensors.items():
            groups[tensor_group(name)] = groups.get(tensor_group(name), 0) + t.nbytes
        return groups

    def quant_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
        return counts

    def parameter_count(self) -> int:
        return int(sum(int(np.prod(t.shape)) for t in self.tensors.values()))

    def release_pages(self) -> None:
        """Drop the file's pages from this process's resident set (they stay in the page cache,
        and fault back in on the next read): after weights are copied into a backend, the
        mapping is only read for embedding rows."""
        if self._reader is not None:
            release_mapped_pages(self._reader.data)

    def close(self) -> None:
        """Drop the reader's mapping (the OS unmaps it once no view is left)."""
        self._reader = None
        self.tensors = {}
        if self._rows_fd is not None:
            os.close(self._rows_fd)
            self._rows_fd = None


def tensor_group(name: str) -> str:
    if name.startswith("token_embd"):
        return "embedding"
    if name.startswith("output."):
        return "output"
    if "norm" in name:
        return "norm"
    if ".attn_" in name:
        return "attention"
    if ".ffn_" in name:
        return "ffn"
    return "other"


def block_bytes(qtype: GGMLQuantizationType) -> tuple[int, int]:
    return GGML_QUANT_SIZES[qtype]


def _decode_string_blob(blob: bytes, count: int) -> list[str]:
    out, offs = [], 0
    for _ in range(count):
        n = struct.unpack_from("<Q", blob, offs)[0]
        out.append(blob[offs + 8 : offs + 8 + n].decode("utf-8", "replace"))
        offs += 8 + n
    return out


def _field_value(field):
    """A reader field as a Python value: str, int, float, bool, or a list of those."""
    types = list(field.types)
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == GGUFValueType.STRING:
            return _decode_string_blob(bytes(field.parts[-1]), int(field.parts[-2][0]))
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    value = field.parts[field.data[0]].tolist()[0]
    return value
