"""Converting a GGUF into the flash format (loaders/flash_format.py says what it holds):
`convert` writes a directory, `ensure_converted` does it once into the user cache directory."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from ..config import ModelConfig
from ..errors import InvalidModelFileError
from ..loaders.flash_format import (
    DOWN_TYPE,
    FLASH_TENSORS,
    MAGIC,
    PREVIEW_BITS,
    PREVIEW_BLOCK,
    VERSION,
    VOCAB_FILES,
    BundleLayout,
    manifest_checksum,
    sha256_file,
)
from ..loaders.gguf_file import GGUFFile, _field_value
from ..registry import cache_dir
from ..vocab.preview import quantize_rows
from .calibration import calibrate


def progress_line(step: int, total: int, what: str) -> None:
    """A one-line progress bar on stderr."""
    width = 30
    done = int(width * step / max(total, 1))
    end = "\n" if step >= total else ""
    print(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} {what:<36}", end=end,
          file=sys.stderr, flush=True)


FINGERPRINT_BYTES = 1 << 20  # read from each end of the GGUF for its cache key


def fingerprint(gguf_path: Path) -> str:
    """A key for the file's content that a copy, a reinstall or a touch keeps: the size and a
    hash of its first and last MiB (the header, the metadata, and weights at the end). The
    modification time, the key before, changed with every reinstall of a model package, so
    each left a stale conversion of up to ~220 MB behind."""
    path = Path(gguf_path)
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as fh:
        h.update(fh.read(FINGERPRINT_BYTES))
        fh.seek(max(0, size - FINGERPRINT_BYTES))
        h.update(fh.read(FINGERPRINT_BYTES))
    return f"{size}-h{h.hexdigest()}"


def _remove_legacy(out: Path, stem: str) -> None:
    """Drop conversions of this model under the old modification-time keys
    (STEM-SIZE-MTIME[-vN]): no current build reads them. Entries under content keys stay."""
    legacy = re.compile(re.escape(stem) + r"-\d+-\d+(-v\d+)?")
    for d in out.parent.iterdir():
        if d != out and d.is_dir() and legacy.fullmatch(d.name):
            shutil.rmtree(d, ignore_errors=True)


def ensure_converted(gguf_path: Path, progress=progress_line) -> Path:
    """The flash directory for gguf_path, converting it the first time."""
    stem = Path(gguf_path).stem
    # the format version is in the name: builds of different versions never fight over a dir
    out = cache_dir() / "flash" / f"{stem}-{fingerprint(gguf_path)}-v{VERSION}"
    if (out / "manifest.json").exists():
        try:
            if json.loads((out / "manifest.json").read_text()).get("version") == VERSION:
                return out
        except ValueError:
            pass  # unreadable: convert again
    out.parent.mkdir(parents=True, exist_ok=True)
    if progress is progress_line:  # an app's own callback shows progress its own way
        print(f"flashinfer-lite: converting {Path(gguf_path).name} to the flash format in {out} "
              "(once) ...", file=sys.stderr, flush=True)
    done = convert(gguf_path, out, calibrate, progress=progress, force=True)
    _remove_legacy(out, stem)
    return done


def encode_bundles(up_raw: np.ndarray, down_dense: np.ndarray, order: np.ndarray,
                   layout: BundleLayout) -> bytes:
    """One layer's section: bundle j = neuron order[j].

    up_raw: (ffn, up_bytes) uint8, the GGUF rows; down_dense: (d_model, ffn) float32.
    """
    buf = np.zeros(layout.section, np.uint8)
    bundles = buf[: layout.stride * layout.ffn_dim].reshape(layout.ffn_dim, layout.stride)
    bundles[:, : layout.up_bytes] = up_raw[order]
    cols = np.ascontiguousarray(down_dense.T[order])  # (ffn, d_model): neuron i's column
    bundles[:, layout.up_bytes : layout.up_bytes + layout.down_bytes] = quantize(cols, DOWN_TYPE)
    return buf.tobytes()


def write_vocab(f: GGUFFile, cfg, order: np.ndarray, out: Path) -> dict:
    """vocab.bin (the head's GGUF rows in `order`, bit-exact), vocab_order.npy and the preview
    head's three arrays; returns the manifest's "vocab" entry."""
    name = f.head_tensor
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
    cfg = ModelConfig.from_gguf(f)
    up_type = f.tensor("blk.0.ffn_up.weight").qtype
    gate_type = f.tensor("blk.0.ffn_gate.weight").qtype
    layout = BundleLayout.for_model(cfg.d_model, cfg.ffn_dim, up_type, gate_type)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        total = cfg.n_layers + 3
        say = progress or (lambda *a: None)
        say(0, total, "calibrating neuron activity")
        cal = calibrate(f)
        # resident.gguf: every tensor but the FFN's, all metadata
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
        with open(tmp / "ffn.bin", "wb") as fh, open(tmp / "gate.bin", "wb") as gh:
            for i in range(cfg.n_layers):
                up = f.tensor(f"blk.{i}.ffn_up.weight")
                gate = f.tensor(f"blk.{i}.ffn_gate.weight")
                for t, want in ((up, up_type), (gate, gate_type)):
                    if t.qtype != want:
                        raise InvalidModelFileError(
                            f"{t.name} is {t.qtype.name}, layer 0's is {want.name}; mixed FFN "
                            "types are not supported by the flash format yet")
                order = np.asarray(cal["order"][i], np.int64)
                section = encode_bundles(np.asarray(up.raw), f.dense(f"blk.{i}.ffn_down.weight"),
                                         order, layout)
                gate_rows = np.zeros(layout.gate_section, np.uint8)
                gate_rows[: layout.ffn_dim * layout.gate_bytes] = \
                    np.asarray(gate.raw).reshape(layout.ffn_dim, -1)[order].reshape(-1)
                gh.write(gate_rows.tobytes())
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
                      for n in ("resident.gguf", "ffn.bin", "gate.bin", *VOCAB_FILES)},
            "layers": layers,
        }
        manifest["checksum"] = manifest_checksum(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        say(total, total, "done")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
