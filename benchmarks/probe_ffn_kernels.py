"""The flash FFN's kernels on one layer of a real model, with llama.cpp's vec_dot for the dot
products (kernels/ggml_dot.py) and with our numba decoders (FLASHINFER_LITE_GGML_DOT=0):

  gate     every gate row of the layer times T rows of x (flash/gate.py's decoding path;
           on the BLAS path from 32 rows with ggml, 8 without, so both are timed)
  bundles  the bundle FFN (up-row dots, then down columns added) over 70% of the layer's
           neurons, a random set per row, as a decoding token computes it; and the same rows
           as a verification pass does (bundle_ffn_rows: the union once, each down column
           decoded once for all rows)

    python benchmarks/probe_ffn_kernels.py [--model qwen2.5-coder-1.5b] [--layer 3]

One thread, data in DRAM (the layer read once), median of 7 runs after a warm-up. Writes
benchmarks/results/ffn_kernels_<model>.json. Time it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = (1, 4, 8, 16, 32)


def _median_ms(fn, runs: int = 7) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main():
    from flashinfer_lite.flash.convert import ensure_converted
    from flashinfer_lite.kernels import ggml_dot
    from flashinfer_lite.kernels.bundle_ffn import (
        bundle_ffn,
        bundle_ffn_rows,
        dequantize_raw,
        raw_matvec,
    )
    from flashinfer_lite.loaders.flash_format import open_flash_dir
    from flashinfer_lite.registry import resolve_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--layer", type=int, default=3)
    a = ap.parse_args()
    man = open_flash_dir(ensure_converted(resolve_model(a.model)), verify_data=False)
    lay = man.layout
    with open(man.gate_path, "rb") as f:
        f.seek(man.gate_offset(a.layer))
        gate = np.frombuffer(f.read(lay.ffn_dim * lay.gate_bytes), np.uint8)
    gate = gate.reshape(lay.ffn_dim, lay.gate_bytes)
    with open(man.ffn_path, "rb") as f:
        f.seek(man.layer(a.layer)["offset"])
        bundles = np.frombuffer(f.read(lay.section), np.uint8).copy()
    rng = np.random.default_rng(0)
    active = int(0.7 * lay.ffn_dim)
    results = []
    for engine in ("ggml", "numba"):
        os.environ["FLASHINFER_LITE_GGML_DOT"] = "1" if engine == "ggml" else "0"
        ggml_dot.reset()
        for t in ROWS:
            x = rng.standard_normal((t, lay.d_model)).astype(np.float32)
            out = np.empty((t, lay.ffn_dim), np.float32)
            gate_ms = _median_ms(lambda x=x, out=out: raw_matvec(x, gate, lay.gate_type, out))

            def dense(x=x, out=out):
                for s in range(0, lay.ffn_dim, 1024):
                    w = dequantize_raw(gate[s : s + 1024], lay.gate_type, lay.d_model)
                    out[:, s : s + len(w)] = x @ w.T

            pos = np.stack([np.sort(rng.choice(lay.ffn_dim, active, replace=False))
                            for _ in range(t)]) * lay.stride
            coef = rng.standard_normal((t, active)).astype(np.float32)
            counts = np.full(t, active, np.int64)
            ffn_ms = _median_ms(lambda x=x, pos=pos, coef=coef, counts=counts:
                                bundle_ffn(x, pos, coef, counts, bundles, lay, 1))
            # the same rows as one verification pass: the union, weights 0 where inactive
            union = np.unique(pos) // lay.stride
            w = np.zeros((t, len(union)), np.float32)
            for row in range(t):
                w[row, np.searchsorted(union, pos[row] // lay.stride)] = coef[row]
            rows_ms = _median_ms(lambda x=x, union=union, w=w: bundle_ffn_rows(
                x, union * lay.stride, w, bundles, lay, 1))
            r = {"engine": engine, "rows": t, "gate_ms": gate_ms, "bundles_union_ms": rows_ms,
                 "gate_blas_ms": _median_ms(dense), "bundles_ms": ffn_ms,
                 "gate_GBps": gate.nbytes / gate_ms / 1e6,
                 "bundle_GBps": active * lay.stride / ffn_ms / 1e6 * t}
            results.append(r)
            print(json.dumps(r), flush=True)
    os.environ.pop("FLASHINFER_LITE_GGML_DOT")
    out = RESULTS / f"ffn_kernels_{a.model}.json"
    out.write_text(json.dumps({
        "benchmark": "ffn_kernels", "model": a.model, "layer": a.layer,
        "machine": platform.platform(), "threads": 1, "active_neurons": active,
        "ffn_dim": lay.ffn_dim, "gate_type": lay.gate_type.name, "up_type": lay.up_type.name,
        "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
