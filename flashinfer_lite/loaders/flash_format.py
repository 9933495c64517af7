"""The flash format: a converted model directory whose FFN up/down weights live on flash as one
contiguous, aligned bundle per neuron (row-column bundling, "LLM in a flash").

    OUT/resident.gguf   everything that stays in DRAM: embeddings, attention, norms, head, and the
                        FFN gate (the exact predictor of which neurons fire), plus all metadata
    OUT/ffn.bin         per layer, a 4 KiB-aligned section of `ffn_dim` bundles in hot-first
                        order; bundle = up row (the GGUF's blocks, bit-exact) + down column
                        (re-encoded as Q8_0 along d_model), padded to `stride` bytes
    OUT/vocab.bin, vocab_order.npy, preview_*.npy
                        the vocabulary on flash (vocab/rows.py: head rows hot-first) and the
                        low-bit preview head that stays resident (vocab/preview.py)
    OUT/manifest.json   magic, version, shapes, per-layer offsets, neuron order and calibration,
                        sha256 of every file and of the manifest itself

Everything is written into OUT.tmp-<pid> and renamed into place at the end, so an interrupted
convert leaves nothing that loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

from ..errors import InvalidModelFileError
from .gguf_file import GGUFFile, _field_value

MAGIC = "flashinfer-lite/flash"
VERSION = 2
ALIGN = 4096  # direct I/O alignment (and a page)
DOWN_TYPE = GGMLQuantizationType.Q8_0
FLASH_TENSORS = ("ffn_up", "ffn_down")
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


def _manifest_checksum(manifest: dict) -> str:
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

    @classmethod
    def for_model(cls, d_model: int, ffn_dim: int, up_type: GGMLQuantizationType):
        per, size = GGML_QUANT_SIZES[up_type]
        up = d_model // per * size
        dper, dsize = GGML_QUANT_SIZES[DOWN_TYPE]
        down = d_model // dper * dsize
        stride = -(-(up + down) // 64) * 64
        section = -(-(stride * ffn_dim) // ALIGN) * ALIGN
        return cls(d_model, ffn_dim, up_type, up, down, stride, section)

    def as_dict(self) -> dict:
        return {"d_model": self.d_model, "ffn_dim": self.ffn_dim, "up_type": self.up_type.name,
                "up_bytes": self.up_bytes, "down_type": DOWN_TYPE.name,
                "down_bytes": self.down_bytes, "stride": self.stride, "section": self.section}

    @classmethod
    def from_dict(cls, d: dict) -> BundleLayout:
        return cls(d["d_model"], d["ffn_dim"], GGMLQuantizationType[d["up_type"]],
                   d["up_bytes"], d["down_bytes"], d["stride"], d["section"])


def encode_bundles(up_raw: np.ndarray, down_dense: np.ndarray, order: np.ndarray,
                   layout: BundleLayout) -> bytes:
    """One layer's section: bundle j = neuron order[j].

    up_raw: (ffn, up_bytes) uint8, the GGUF rows; down_dense: (d_model, ffn) float32.
    """
    from gguf.quants import quantize

    buf = np.zeros(layout.section, np.uint8)
    bundles = buf[: layout.stride * layout.ffn_dim].reshape(layout.ffn_dim, layout.stride)
    bundles[:, : layout.up_bytes] = up_raw[order]
    cols = np.ascontiguousarray(down_dense.T[order])  # (ffn, d_model): neuron i's column
    bundles[:, layout.up_bytes : layout.up_bytes + layout.down_bytes] = quantize(cols, DOWN_TYPE)
    return buf.tobytes()


def head_tensor(f: GGUFFile) -> str:
    """The output head's rows: its own tensor, or the token embedding when tied."""
    return "output.weight" if "output.weight" in f.tensors else "token_embd.weight"


def write_vocab(f: GGUFFile, cfg, order: np.ndarray, out: Path) -> dict:
    """vocab.bin (the head's GGUF rows in `order`, bit-exact), vocab_order.npy and the preview
    head's three arrays; returns the manifest's "vocab" entry."""
    from ..vocab.preview import quantize_rows

    name = head_tensor(f)
    t = f.tensor(name)
    if t.shape != (cfg.vocab_size, cfg.d_model):
        raise InvalidModelFileError(f"{name} has shape {t.shape}; expected "
                                    f"({cfg.vocab_size}, {cfg.d_model})")
    if sorted(order.tolist()) != list(range(cfg.vocab_size)):
        raise ValueError("token order is not a permutation of the vocabulary")
    raw = np.asarray(t.raw).reshape(cfg.vocab_size, -1)  # (V, row bytes)
    with open(out / "vocab.bin", "wb") as fh:
        for s in range(0, len(order), 16384):
            fh.write(np.ascontiguousarray(raw[order[s : s + 16384]]).tobytes())
    np.save(out / "vocab_order.npy", order.astype(np.int32))
    grid = quantize_rows(lambda s, e: f.rows(name, np.arange(s, e)), cfg.vocab_size,
                         cfg.d_model, PREVIEW_BITS, PREVIEW_BLOCK)
    np.save(out / "preview_codes.npy", grid.codes)
    np.save(out / "preview_scale.npy", grid.scale)
    np.save(out / "preview_zero.npy", grid.zero)
    return {"tensor": name, "qtype": t.qtype.name, "rows": cfg.vocab_size,
            "row_bytes": int(raw.shape[1]), "tied": name == "token_embd.weight",
            "preview": {"bits": PREVIEW_BITS, "block": PREVIEW_BLOCK}}


def _copy_metadata(src: GGUFFile, w: GGUFWriter) -> None:
    for name, field in src._fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = GGUFValueType(int(field.types[0]))
        sub = GGUFValueType(int(field.types[1])) if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, _field_value(field), vtype, sub)


def convert(gguf_path: Path, out: Path, calibrate, progress=None, force: bool = False) -> Path:
    """Write the flash directory for gguf_path at out.

    calibrate(f) -> dict with per-layer "order" (ffn,) hot-first, "weight" (ffn,) and
    "thresholds" {skip fraction: score threshold}; see flash/calibration.py.
    progress(step, total, what) is called as work proceeds.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists (use --force to replace it)")
    f = GGUFFile(gguf_path)
    from ..config import ModelConfig

    cfg = ModelConfig.from_gguf(f)
    up_type = f.tensor("blk.0.ffn_up.weight").qtype
    layout = BundleLayout.for_model(cfg.d_model, cfg.ffn_dim, up_type)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        total = cfg.n_layers + 3
        say = progress or (lambda *a: None)
        say(0, total, "calibrating neuron activity")
        cal = calibrate(f)
        # resident.gguf: every tensor but the FFN up/down, all metadata
        w = GGUFWriter(str(tmp / "resident.gguf"), f.architecture)
        _copy_metadata(f, w)
        for name, t in f.tensors.items():
            if any(f".{k}." in name for k in FLASH_TENSORS):
                continue
            if t.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                w.add_tensor(name, np.asarray(t.raw))  # dtype says the type
            else:
                w.add_tensor(name, np.asarray(t.raw), raw_dtype=t.qtype)  # (rows, bytes)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        say(1, total, "wrote resident part")
        layers = []
        with open(tmp / "ffn.bin", "wb") as fh:
            for i in range(cfg.n_layers):
                up = f.tensor(f"blk.{i}.ffn_up.weight")
                if up.qtype != up_type:
                    raise InvalidModelFileError(
                        f"ffn_up of layer {i} is {up.qtype.name}, layer 0's is {up_type.name}; "
                        "mixed FFN types are not supported by the flash format yet")
                order = np.asarray(cal["order"][i], np.int64)
                section = encode_bundles(np.asarray(up.raw), f.dense(f"blk.{i}.ffn_down.weight"),
                                         order, layout)
                layers.append({
                    "offset": i * layout.section,
                    "sha256": hashlib.sha256(section).hexdigest(),
                    "order": order.tolist(),
                    "weight": np.asarray(cal["weight"][i], np.float32).tolist(),
                    "thresholds": {str(k): float(v) for k, v in cal["thresholds"][i].items()},
                })
                fh.write(section)
                say(i + 2, total, f"layer {i + 1}/{cfg.n_layers}")
        vocab = write_vocab(f, cfg, np.asarray(cal["token_order"]), tmp)
        say(total - 1, total, "vocabulary and preview head")
        manifest = {
            "magic": MAGIC, "version": VERSION, "architecture": cfg.architecture,
            "name": cfg.name, "n_layers": cfg.n_layers, "layout": layout.as_dict(),
            "source": {"file": Path(gguf_path).name, "size": f.file_size},
            "calibration": cal.get("info", {}),
            "vocab": vocab,
            "files": {n: {"size": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)}
                      for n in ("resident.gguf", "ffn.bin", *VOCAB_FILES)},
            "layers": layers,
        }
        manifest["checksum"] = _manifest_checksum(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        say(total, total, "done")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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

    def layer(self, i: int) -> dict:
        return self.data["layers"][i]

    @property
    def vocab(self) -> dict:
        return self.data["vocab"]

    def preview(self):
        """The resident preview head (vocab/preview.PackedGrid), memory-mapped."""
        from ..vocab.preview import PackedGrid

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
    if data.get("checksum") != _manifest_checksum(data):
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
