"""The flash format: a converted model directory whose FFN up/down weights live on flash as one
contiguous, aligned bundle per neuron (row-column bundling, "LLM in a flash").

    OUT/resident.gguf   everything that stays in DRAM: embeddings, attention, norms, head, plus
                        all metadata
    OUT/gate.bin        per layer, a 4 KiB-aligned section of the FFN gate's `ffn_dim` rows (the
                        GGUF's blocks, bit-exact) in the bundles' order: the exact predictor of
                        which neurons fire, read whole each token (or held, as the budget allows)
    OUT/ffn.bin         per layer, a 4 KiB-aligned section of `ffn_dim` bundles in hot-first
                        order; bundle = up row (the GGUF's blocks, bit-exact) + down column
                        (re-encoded as Q8_0 along d_model), padded to `stride` bytes
    OUT/vocab.bin, vocab_order.npy, preview_*.npy
                        the vocabulary on flash (vocab/rows.py: head rows hot-first) and the
                        low-bit preview head that stays resident (vocab/preview.py)
    OUT/manifest.json   magic, version, shapes, per-layer offsets, neuron order and calibration,
                        sha256 of every file and of the manifest itself

flash/convert.py writes it: everything into OUT.tmp-<pid>, renamed into place at the end, so an
interrupted convert leaves nothing that loads. This module reads and validates it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import InvalidModelFileError
from .packed_grid import PackedGrid

MAGIC = "flashinfer-lite/flash"
# 3: the gate moved from resident.gguf to gate.bin (its DRAM copy was a third of the 1.5B
# model's resident part)
VERSION = 3
ALIGN = 4096  # direct I/O alignment (and a page)
DOWN_TYPE = GGMLQuantizationType.Q8_0
FLASH_TENSORS = ("ffn_gate", "ffn_up", "ffn_down")
# The preview head: 4-bit codes in groups of 64 (4.56 bits per weight with scales and zero
# points). 2-bit previews missed the true top-1 among 128 candidates at ~1% of positions on
# SmolLM2 (benchmarks/results/vocab_fidelity_*.json); 4-bit kept it within 32 everywhere.
PREVIEW_BITS, PREVIEW_BLOCK = 4, 64
VOCAB_FILES = ("vocab.bin", "vocab_order.npy", "preview_codes.npy", "preview_scale.npy",
               "preview_zero.npy")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def is_flash_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "manifest.json").exists()


@dataclass
class BundleLayout:
    d_model: int
    ffn_dim: int
    up_type: GGMLQuantizationType
    up_bytes: int  # one up row, GGUF blocks
    down_bytes: int  # one down column, Q8_0 blocks
    stride: int  # bytes per bundle, a multiple of 64
    section: int  # bytes per layer section, a multiple of ALIGN
    gate_type: GGMLQuantizationType
    gate_bytes: int  # one gate row, GGUF blocks
    gate_section: int  # bytes per layer of gate.bin, a multiple of ALIGN

    @classmethod
    def for_model(cls, d_model: int, ffn_dim: int, up_type: GGMLQuantizationType,
                  gate_type: GGMLQuantizationType):
        up, gate = row_bytes(up_type, d_model), row_bytes(gate_type, d_model)
        down = row_bytes(DOWN_TYPE, d_model)
        stride = -(-(up + down) // 64) * 64
        section = -(-(stride * ffn_dim) // ALIGN) * ALIGN
        gate_section = -(-(gate * ffn_dim) // ALIGN) * ALIGN
        return cls(d_model, ffn_dim, up_type, up, down, stride, section, gate_type, gate,
                   gate_section)

    def as_dict(self) -> dict:
        return {"d_model": self.d_model, "ffn_dim": self.ffn_dim, "up_type": self.up_type.name,
                "up_bytes": self.up_bytes, "down_type": DOWN_TYPE.name,
                "down_bytes": self.down_bytes, "stride": self.stride, "section": self.section,
                "gate_type": self.gate_type.name, "gate_bytes": self.gate_bytes,
                "gate_section": self.gate_section}

    @classmethod
    def from_dict(cls, d: dict) -> BundleLayout:
        return cls(d["d_model"], d["ffn_dim"], GGMLQuantizationType[d["up_type"]],
                   d["up_bytes"], d["down_bytes"], d["stride"], d["section"],
                   GGMLQuantizationType[d["gate_type"]], d["gate_bytes"], d["gate_section"])


def row_bytes(qtype: GGMLQuantizationType, k: int) -> int:
    """Bytes of one k-wide row in qtype's blocks."""
    per, size = GGML_QUANT_SIZES[qtype]
    return k // per * size


@dataclass
class FlashManifest:
    path: Path
    data: dict
    layout: BundleLayout

    @property
    def resident_path(self) -> Path:
        return self.path / "resident.gguf"

    @property
    def ffn_path(self) -> Path:
        return self.path / "ffn.bin"

    @property
    def gate_path(self) -> Path:
        return self.path / "gate.bin"

    def gate_offset(self, i: int) -> int:
        return i * self.layout.gate_section

    def layer(self, i: int) -> dict:
        return self.data["layers"][i]

    @property
    def vocab(self) -> dict:
        return self.data["vocab"]

    def preview(self):
        """The resident preview head (a loaders/packed_grid.PackedGrid), memory-mapped."""
        v = self.data["vocab"]
        codes = np.load(self.path / "preview_codes.npy", mmap_mode="r")
        return PackedGrid(v["preview"]["bits"], v["preview"]["block"], v["rows"],
                          self.layout.d_model, codes,
                          np.load(self.path / "preview_scale.npy", mmap_mode="r"),
                          np.load(self.path / "preview_zero.npy", mmap_mode="r"))

    def token_order(self) -> np.ndarray:
        return np.load(self.path / "vocab_order.npy")


def open_flash_dir(path: Path, verify_data: bool = True) -> FlashManifest:
    """Validate a flash directory: magic, version, checksums, sizes. Raises InvalidModelFileError
    naming what is wrong."""
    path = Path(path)
    try:
        data = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidModelFileError(f"{path}: unreadable manifest.json ({exc})") from None
    if not isinstance(data, dict) or data.get("magic") != MAGIC:
        raise InvalidModelFileError(f"{path} is not a flashinfer-lite flash directory")
    if data.get("version") != VERSION:
        raise InvalidModelFileError(
            f"{path} has flash format version {data.get('version')}; this build reads {VERSION}")
    if data.get("checksum") != manifest_checksum(data):
        raise InvalidModelFileError(f"{path}/manifest.json is corrupt (checksum mismatch)")
    for name, info in data["files"].items():
        p = path / name
        if not p.exists():
            raise InvalidModelFileError(f"{path} lacks {name}")
        if p.stat().st_size != info["size"]:
            raise InvalidModelFileError(
                f"{p} is truncated or altered: {p.stat().st_size} bytes, expected {info['size']}")
        if verify_data and sha256_file(p) != info["sha256"]:
            raise InvalidModelFileError(f"{p} is corrupt (sha256 mismatch)")
    return FlashManifest(path, data, BundleLayout.from_dict(data["layout"]))
