"""Where the ONNX Runtime backend's resident memory goes: per kind of weight, and per model with
MatMulNBits' inputs kept (as ORT holds them by default) or dropped after prepacking
(kernels/onnxruntime_backend._PackedInputs).

    python benchmarks/probe_ort_memory.py [--models qwen2.5-coder-0.5b qwen2.5-coder-1.5b]
                                          [--rounds 2] [--threads 2] [--decode-tokens 32]

Per kind: one tensor of each quant type compiled alone, its anonymous RSS growth (median of 3
compiles) against its GGUF bytes and the initializer bytes we build. Per model: each variant
in a fresh child process, children alternating keep/drop within a round; RSS over the child's
baseline after loading and after decoding, the load peak, decode tok/s and the greedy tokens
(the variants must agree). Writes benchmarks/results/ort_memory.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("keep", "drop")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"{field}:\s+(\d+)", fh.read()).group(1)) * 1024


def _set_drop(variant: str, threads: int) -> None:
    from flashinfer_lite.kernels import onnxruntime_backend as ob

    ob._DROPS.pop(4, None)  # accuracy_level 4, the default: probed again by warm()
    ob.OnnxRuntimeBackend(threads).warm()  # the runtime's process state, outside the budget
    if variant == "keep":
        ob._DROPS[4] = False  # hold MatMulNBits' inputs as ORT does by default


def kinds_child(model: str, threads: int) -> None:
    import gc

    from flashinfer_lite.kernels.onnxruntime_backend import OnnxRuntimeBackend
    from flashinfer_lite.loaders.gguf_file import GGUFFile
    from flashinfer_lite.memory import release_freed_memory
    from flashinfer_lite.registry import resolve_model

    f = GGUFFile(resolve_model(model))
    picks = {}
    for name in f.tensors:
        t = f.tensor(name)
        if len(t.shape) == 2 and name.startswith("blk.") and t.qtype.name not in picks:
            picks[t.qtype.name] = name
    out = []
    for variant in VARIANTS:
        _set_drop(variant, threads)
        backend = OnnxRuntimeBackend(threads)
        for qtype, name in sorted(picks.items()):
            t = f.tensor(name)
            deltas, segs = [], []
            for _ in range(3):
                gc.collect()
                release_freed_memory()
                before = _status_kb("RssAnon")
                segs.append(backend.compile(f, lambda g, x, n=name: [g.linear(x, n)],
                                            [t.shape[1]]))
                f.release_pages()
                gc.collect()
                release_freed_memory()
                deltas.append(_status_kb("RssAnon") - before)
            out.append(dict(variant=variant, qtype=qtype, tensor=name, shape=list(t.shape),
                            file_bytes=t.nbytes, initializer_bytes=segs[0].nbytes,
                            anon_rss_bytes=statistics.median(deltas)))
    print(json.dumps(out))


def model_child(model: str, variant: str, threads: int, decode_tokens: int) -> None:
    import flashinfer_lite as fl
    from flashinfer_lite.memory import peak_rss_bytes, rss_bytes
    from flashinfer_lite.registry import resolve_model

    _set_drop(variant, threads)
    path = resolve_model(model)
    base = rss_bytes()
    t0 = time.perf_counter()
    m = fl.load(path, threads=threads)
    load_s = time.perf_counter() - t0
    out = dict(model=model, variant=variant, file_bytes=path.stat().st_size, load_s=load_s,
               load_peak=peak_rss_bytes() - base, after_load=rss_bytes() - base,
               anon_after_load=_status_kb("RssAnon"), resident_bytes=m.resident_bytes)
    ids = m.tokenize("def quicksort(items):\n    \"\"\"Sort a list.\"\"\"\n")
    chunks = list(m.stream(ids, max_tokens=decode_tokens, temperature=0.0))
    s = m.stats
    out.update(after_decode=rss_bytes() - base, peak=peak_rss_bytes() - base,
               decode_tokens_per_s=s["tokens_per_s"],
               tokens=[c.token for c in chunks if c.token is not None])
    print(json.dumps(out))


def _run(args: list[str]):
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"child {args} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "VARIANT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        if a.child[0] == "kinds":
            return kinds_child(a.models[0], a.threads)
        return model_child(a.models[0], a.child[1], a.threads, a.decode_tokens)
    common = ["--threads", str(a.threads), "--decode-tokens", str(a.decode_tokens)]
    report = {"threads": a.threads, "models": {}}
    for model in a.models:
        kinds = _run(["--models", model, "--child", "kinds", "-", *common])
        runs = {v: [] for v in VARIANTS}
        for _ in range(a.rounds):
            for v in VARIANTS:
                runs[v].append(_run(["--models", model, "--child", "model", v, *common]))
        summary = {}
        for v, rs in runs.items():
            summary[v] = {k: statistics.median(r[k] for r in rs)
                          for k in ("load_peak", "after_load", "after_decode", "peak",
                                    "decode_tokens_per_s", "load_s")}
            summary[v]["file_bytes"] = rs[0]["file_bytes"]
        same = all(r["tokens"] == runs["keep"][0]["tokens"] for rs in runs.values() for r in rs)
        report["models"][model] = dict(kinds=kinds, runs=runs, summary=summary,
                                       greedy_tokens_equal=same)
        print(f"{model}: greedy tokens equal across variants: {same}")
        for k in kinds:
            print(f"  {k['variant']:4} {k['qtype']:5} {k['tensor']:24} file "
                  f"{k['file_bytes'] / 1e6:7.2f} MB  initializers "
                  f"{k['initializer_bytes'] / 1e6:7.2f}  anon RSS {k['anon_rss_bytes'] / 1e6:7.2f}")
        for v, s in summary.items():
            fb = s["file_bytes"]
            print(f"  {v:4}: held after load {s['after_load'] / 1e6:7.0f} MB "
                  f"({s['after_load'] / fb:.2f}x file), after decode {s['after_decode'] / 1e6:7.0f}"
                  f" ({s['after_decode'] / fb:.2f}x), load peak {s['load_peak'] / 1e6:7.0f} "
                  f"({s['load_peak'] / fb:.2f}x), decode {s['decode_tokens_per_s']:.2f} tok/s, "
                  f"load {s['load_s']:.1f} s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ort_memory.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
