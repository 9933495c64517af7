"""Could a low-bit copy of the FFN gate stand in for the exact gate as the predictor of which
neurons a token needs? For layers of a model, over calibration text: the gate quantized to 2
bits (groups of 64 and 32) and 4 bits (groups of 64), its correlation with the exact gate's
pre-activations, and how much of the exact skip rule's active set (skip fraction 0.3) the
predictor's top candidates cover, by contribution mass and by count, at candidate fractions
0.5 ... 0.8.

    python benchmarks/probe_gate_predictor.py [--model qwen2.5-coder-1.5b] [--tokens 64]

Writes benchmarks/results/gate_predictor_<model>.json. The dense model runs in float32 from
gguf's dequantizers (flash/calibration.py's recording path), so this takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
GRIDS = ((2, 64), (2, 32), (4, 64))
CANDIDATES = (0.5, 0.6, 0.7, 0.8)


def main():
    from flashinfer_lite.cache.kv import KVSpec
    from flashinfer_lite.config import ModelConfig
    from flashinfer_lite.flash.calibration import calibration_ids
    from flashinfer_lite.kernels.base import default_threads
    from flashinfer_lite.kernels.onnxruntime_backend import OnnxRuntimeBackend
    from flashinfer_lite.kernels.ops import ACTIVATIONS
    from flashinfer_lite.loaders.gguf_file import GGUFFile
    from flashinfer_lite.models import build_model
    from flashinfer_lite.registry import resolve_model
    from flashinfer_lite.tokenizer import Tokenizer
    from flashinfer_lite.vocab.preview import quantize

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--every", type=int, default=3, help="probe every n-th layer")
    a = ap.parse_args()
    f = GGUFFile(resolve_model(a.model))
    cfg = ModelConfig.from_gguf(f)
    act = ACTIVATIONS[cfg.activation]
    layers = []

    def ffn(layer, h):
        p = f"blk.{layer}."
        wg, wu = f.dense(p + "ffn_gate.weight"), f.dense(p + "ffn_up.weight")
        wd = f.dense(p + "ffn_down.weight")  # (d, ffn)
        g = h @ wg.T  # (T, ffn)
        a_, u = act(g), h @ wu.T
        dn = np.linalg.norm(wd, axis=0)
        c = np.abs(a_ * u) * dn  # each neuron's contribution
        w = np.abs(u).mean(0) * dn
        s = np.abs(a_) * w  # the skip rule's score
        if layer % a.every == 0:
            active = s >= np.quantile(s, 0.3, axis=1, keepdims=True)
            row = {"layer": layer, "grids": []}
            for bits, block in GRIDS:
                gq = h @ quantize(wg, bits, block).dequantize().T
                sq = np.abs(act(gq)) * w
                cover = []
                for frac in CANDIDATES:
                    pred = sq >= np.quantile(sq, 1 - frac, axis=1, keepdims=True)
                    cover.append({"candidates": frac,
                                  "mass": float((c * (active & pred)).sum() / (c * active).sum()),
                                  "count": float((active & pred).sum() / active.sum())})
                row["grids"].append({"bits": bits, "block": block,
                                     "corr": float(np.corrcoef(g.ravel(), gq.ravel())[0, 1]),
                                     "cover": cover})
            layers.append(row)
            print(json.dumps(row), flush=True)
        return (a_ * u) @ wd.T

    net = build_model(f, OnnxRuntimeBackend(default_threads()), cfg, ffn=ffn)
    ids = calibration_ids(Tokenizer(f.path), a.tokens)
    net.forward(np.asarray(ids), net.make_cache(KVSpec("f16")))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"gate_predictor_{a.model}.json"
    out.write_text(json.dumps({"model": a.model, "tokens": len(ids), "skip_fraction": 0.3,
                               "layers": layers}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
