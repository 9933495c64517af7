"""Does the process stay within the memory budget? For each budget: a fresh child loads the
model with `memory_budget`, generates, and reports peak RSS minus its own baseline (the
interpreter with numpy, ONNX Runtime (its process-wide environment created), llama.cpp's library
and the numba kernel's compiled code loaded, before any model byte is read: the runtime, which
a second model in the same process would not pay again).

    python benchmarks/bench_budget.py [--model smollm2-135m] [--budgets 120MB 150MB 200MB]
    python benchmarks/bench_budget.py --floor [--model M]

Writes benchmarks/results/budget_<model>.json. --floor measures what the smallest resident
part is made of (vocabulary on flash, 5% of the FFN in DRAM): llama.cpp's tokenizer alone,
then the whole resident part, in RSS over the same baseline, beside the weight bytes the
backend holds (ONNX Runtime sessions) and the preview head's bytes; merged into the JSON as
"floor".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def child(model: str, budget: str, tokens: int):
    import llama_cpp  # noqa: F401
    import numpy as np
    import onnxruntime  # noqa: F401

    from flashinfer_lite.flash.convert import ensure_converted
    from flashinfer_lite.kernels import bundle_ffn
    from flashinfer_lite.memory import peak_rss_bytes, release_freed_memory, rss_bytes
    from flashinfer_lite.registry import resolve_model

    path = resolve_model(model)
    ensure_converted(path)  # conversion is a one-time step, not part of a run
    bundle_ffn.warm()  # numba's JIT machinery and our kernel's code: the runtime, not the model
    from flashinfer_lite.kernels.base import default_threads
    from flashinfer_lite.kernels.onnxruntime_backend import OnnxRuntimeBackend

    OnnxRuntimeBackend(default_threads()).warm()  # ORT's process-wide environment, likewise
    release_freed_memory()
    base = rss_bytes()
    import flashinfer_lite as fl

    m = fl.load(path, memory_budget=budget)
    out = m.generate("The history of the city of Rome", max_tokens=tokens)
    s = m.stats
    after = rss_bytes()
    print(json.dumps({
        "budget": budget, "budget_bytes": m.memory_budget, "plan": m.plan.as_dict()
        if m.plan else None, "baseline_rss": base, "peak_rss": peak_rss_bytes(),
        "peak_minus_baseline": peak_rss_bytes() - base, "rss_after_minus_baseline": after - base,
        "resident_bytes": m.resident_bytes, "vocab_on_flash": m.vocab_head is not None,
        "vocab_bytes": m.vocab_bytes,
        "vocab_bytes_read_per_token": s.get("vocab_bytes_read_per_token"),
        "head_time_share": s.get("head_time_share"), "file_bytes": path.stat().st_size,
        "kv_bytes": s["kv_bytes"], "tokens_per_s": s["tokens_per_s"],
        "flash_bytes_read_per_token": s.get("flash_bytes_read_per_token"), "text": out[:80],
        "within_budget": bool(peak_rss_bytes() - base <= m.memory_budget),
        "held_within_budget": bool(after - base <= m.memory_budget),
        "_np": np.__version__}))


def floor_child(model: str):
    """RSS of the tokenizer alone, then of the smallest resident part, over the runtime."""
    import llama_cpp  # noqa: F401
    import onnxruntime  # noqa: F401

    from flashinfer_lite.flash.convert import ensure_converted
    from flashinfer_lite.kernels import bundle_ffn
    from flashinfer_lite.kernels.base import default_threads
    from flashinfer_lite.kernels.onnxruntime_backend import OnnxRuntimeBackend
    from flashinfer_lite.memory import release_freed_memory, rss_bytes
    from flashinfer_lite.registry import resolve_model
    from flashinfer_lite.tokenizer import Tokenizer

    path = resolve_model(model)
    flash_dir = ensure_converted(path)
    bundle_ffn.warm()
    OnnxRuntimeBackend(default_threads()).warm()
    release_freed_memory()
    base = rss_bytes()
    tok = Tokenizer(flash_dir / "resident.gguf")
    tokenizer_rss = rss_bytes() - base
    del tok
    release_freed_memory()
    import flashinfer_lite as fl

    m = fl.load(flash_dir, ffn_share=0.05, vocab_on_flash=True)
    kv_1024 = m.kv_bytes_needed(1024)
    print(json.dumps({
        "file_bytes": path.stat().st_size, "half_file_bytes": path.stat().st_size // 2,
        "tokenizer_rss": tokenizer_rss, "resident_rss": m.resident_rss_bytes,
        "backend_weight_bytes": m.net.nbytes, "preview_and_row_bytes": m.vocab_bytes,
        "kv_bytes_1024_f16": kv_1024, "pool_bytes_at_5pct": m.flash.nbytes,
        "held_bytes": m.held_bytes}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", nargs="+", default=["120MB", "150MB", "200MB"])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--child", default=None)
    ap.add_argument("--floor", action="store_true")
    ap.add_argument("--floor-child", action="store_true")
    a = ap.parse_args()
    out = RESULTS / f"budget_{a.model}.json"
    if a.floor_child:
        floor_child(a.model)
        return
    if a.floor:
        proc = subprocess.run([sys.executable, __file__, "--floor-child", "--model", a.model],
                              stdout=subprocess.PIPE, text=True, check=True)
        floor = json.loads(proc.stdout.strip().splitlines()[-1])
        report = json.loads(out.read_text()) if out.exists() else {
            "benchmark": "budget", "model": a.model, "runs": []}
        report["floor"] = floor
        out.write_text(json.dumps(report, indent=2))
        print(json.dumps(floor, indent=2))
        return
    if a.child:
        child(a.model, a.child, a.tokens)
        return
    runs = []
    for b in a.budgets:
        proc = subprocess.run([sys.executable, __file__, "--child", b, "--model", a.model,
                               "--tokens", str(a.tokens)], capture_output=True, text=True)
        if proc.returncode != 0:
            runs.append({"budget": b, "error": proc.stderr.strip().splitlines()[-1]})
        else:
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        if "error" in r:
            print(f"budget {b}: {r['error']}", flush=True)
            continue
        share = r["plan"]["ffn_share"] if r["plan"] else 1.0
        print(f"budget {b}: RSS after - baseline {r['rss_after_minus_baseline'] / 1e6:.0f} MB, "
              f"peak RSS - baseline {r['peak_minus_baseline'] / 1e6:.0f} MB "
              f"(baseline {r['baseline_rss'] / 1e6:.0f} MB), within: {r['within_budget']}, "
              f"FFN share {share:.2f}, vocabulary on flash: {r['vocab_on_flash']}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "budget", "model": a.model, "runs": runs}
    if out.exists() and "floor" in json.loads(out.read_text()):
        report["floor"] = json.loads(out.read_text())["floor"]
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
