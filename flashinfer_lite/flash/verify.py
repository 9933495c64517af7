"""`flashinfer-lite convert --verify`: checksums, and bundles against their source GGUF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf.quants import dequantize

from ..errors import InvalidModelFileError
from ..loaders.flash_format import DOWN_TYPE, open_flash_dir
from ..loaders.gguf_file import GGUFFile


def verify_flash_dir(path: Path, source: Path | None = None) -> str:
    """Check every checksum; with the source GGUF, check every layer's gate and up rows
    bit-exactly, its down columns to Q8_0's error. Raises InvalidModelFileError on any
    mismatch."""
    man = open_flash_dir(path, verify_data=True)
    if source is None:
        return "checksums ok"
    f, lay = GGUFFile(source), man.layout
    worst = 0.0
    for i in range(man.data["n_layers"]):
        sec = np.fromfile(man.ffn_path, np.uint8, count=lay.section,
                          offset=man.layer(i)["offset"])
        raw = sec[: lay.ffn_dim * lay.stride].reshape(lay.ffn_dim, lay.stride)
        order = np.asarray(man.layer(i)["order"])
        up = np.asarray(f.tensor(f"blk.{i}.ffn_up.weight").raw)[order]
        if not np.array_equal(raw[:, : lay.up_bytes], up):
            raise InvalidModelFileError(f"{path}: layer {i} up rows differ from {source}")
        gate = np.fromfile(man.gate_path, np.uint8, count=lay.ffn_dim * lay.gate_bytes,
                           offset=man.gate_offset(i)).reshape(lay.ffn_dim, lay.gate_bytes)
        if not np.array_equal(gate, np.asarray(
                f.tensor(f"blk.{i}.ffn_gate.weight").raw).reshape(lay.ffn_dim, -1)[order]):
            raise InvalidModelFileError(f"{path}: layer {i} gate rows differ from {source}")
        cols = dequantize(raw[:, lay.up_bytes : lay.up_bytes + lay.down_bytes], DOWN_TYPE)
        ref = f.dense(f"blk.{i}.ffn_down.weight").T[order]
        rel = float(np.abs(cols - ref).max() / (np.abs(ref).max() + 1e-12))
        worst = max(worst, rel)
        if rel > 0.01:
            raise InvalidModelFileError(f"{path}: layer {i} down columns off by {rel:.3%}")
    v = man.vocab
    order = man.token_order()
    rows = np.fromfile(man.path / "vocab.bin", np.uint8).reshape(v["rows"], v["row_bytes"])
    if not np.array_equal(rows, np.asarray(f.tensor(v["tensor"]).raw).reshape(
            v["rows"], v["row_bytes"])[order]):
        raise InvalidModelFileError(f"{path}: vocabulary rows differ from {source}")
    return (f"checksums ok; gate and up rows bit-exact; down columns within {worst:.3%} of "
            "the GGUF; vocabulary rows bit-exact")
