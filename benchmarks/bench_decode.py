"""Decode and prefill speed, load time and memory: flashinfer-lite vs llama.cpp, same GGUF, same
thread count, in one run, for one model or several.

Each measurement runs in a fresh child process (so peak RSS belongs to one engine), children
alternate A B A B ... within each round, and the report gives medians and the ratio to llama.cpp.
RSS is reported over each child's baseline (the interpreter with numpy, ONNX Runtime and
llama.cpp's library imported): at the peak of loading, at the peak of the whole run, and held
after generating.

    python benchmarks/bench_decode.py [--models smollm2-135m gemma3-270m qwen2.5-coder-0.5b
                                       qwen2.5-coder-1.5b] [--rounds 2] [--threads 2]

Writes benchmarks/results/decode_<model>.json per model, and with several models
decode_all.json and decode_all.png (a table and a plot of all of them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def child(engine: str, model: str, threads: int, prompt_tokens: int, decode_tokens: int):
    import pydoc_data.topics

    import numpy as np

    from flashinfer_lite.memory import peak_rss_bytes, rss_bytes
    from flashinfer_lite.registry import resolve_model

    path = resolve_model(model)
    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))[:20000]
    if engine == "flashinfer-lite":
        # library code counts in the baseline, as it does for llama.cpp's child
        import llama_cpp  # noqa: F401
        import onnxruntime  # noqa: F401

        import flashinfer_lite as fl

        base = rss_bytes()
        t0 = time.perf_counter()
        m = fl.load(path, threads=threads)
        load_s = time.perf_counter() - t0
        load_peak = peak_rss_bytes()
        ids = m.tokenize(text)[:prompt_tokens]
        t0 = time.perf_counter()
        chunks = list(m.stream(ids, max_tokens=decode_tokens, temperature=0.0))
        total = time.perf_counter() - t0
        s = m.stats
        out = dict(prefill_s=s["ttft_s"], decode_tokens=s["generated_tokens"],
                   decode_s=total - s["ttft_s"], resident_bytes=m.resident_bytes,
                   tokens=[c.token for c in chunks if c.token is not None])
    else:
        import onnxruntime  # noqa: F401  (imported by flashinfer_lite.memory's callers too)

        from flashinfer_lite.reference import llama_cpp_model

        base = rss_bytes()
        t0 = time.perf_counter()
        llm = llama_cpp_model(path, n_threads=threads, n_threads_batch=threads,
                              n_ctx=prompt_tokens + decode_tokens + 16, n_batch=512)
        load_s = time.perf_counter() - t0
        load_peak = peak_rss_bytes()
        ids = llm.tokenize(text.encode())[:prompt_tokens]
        n_vocab = llm.n_vocab()

        def last_logits():
            # llama-cpp-python keeps `scores` only with logits_all=True; read llama.cpp's own
            # buffer (the last evaluated position) as its sampler does
            return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

        t0 = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t0
        tokens = []
        t1 = time.perf_counter()
        tok = int(np.argmax(last_logits()))
        for _ in range(decode_tokens):
            tokens.append(tok)
            if len(tokens) == decode_tokens:
                break
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
        decode = time.perf_counter() - t1
        out = dict(prefill_s=prefill, decode_tokens=len(tokens), decode_s=decode,
                   tokens=tokens, llama_cpp_extra_buffers=llm.extra_buffers)
    out.update(engine=engine, load_s=load_s, prompt_tokens=len(ids), baseline_rss=base,
               load_peak_rss_bytes=load_peak,
               peak_rss_bytes=peak_rss_bytes(), rss_after=rss_bytes(),
               file_bytes=path.stat().st_size)
    # tokens after the first are generated one at a time: decode rate excludes the first
    out["decode_tokens_per_s"] = (out["decode_tokens"] - 1) / out["decode_s"]
    out["prefill_tokens_per_s"] = out["prompt_tokens"] / out["prefill_s"]
    print(json.dumps(out))


ENGINES = ("llama.cpp", "flashinfer-lite")
KEYS = ("decode_tokens_per_s", "prefill_tokens_per_s", "peak_rss_bytes", "load_peak_rss_bytes",
        "rss_after", "baseline_rss", "load_s")


def run_child(a, engine: str, model: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", engine, "--models", model, "--threads",
         str(a.threads), "--prompt-tokens", str(a.prompt_tokens), "--decode-tokens",
         str(a.decode_tokens)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} on {model} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report_for(a, model: str, runs: dict) -> dict:
    def med(e, key):
        return statistics.median(x[key] for x in runs[e])

    summary = {e: {k: med(e, k) for k in KEYS} for e in ENGINES}
    for e in ENGINES:  # RSS attributable to the model, over the child's baseline
        base = summary[e]["baseline_rss"]
        summary[e]["model_rss_bytes"] = summary[e]["peak_rss_bytes"] - base
        summary[e]["model_load_peak_bytes"] = summary[e]["load_peak_rss_bytes"] - base
        summary[e]["model_rss_after_bytes"] = summary[e]["rss_after"] - base
    ours, ref = summary["flashinfer-lite"], summary["llama.cpp"]
    file_bytes = runs["llama.cpp"][0]["file_bytes"]
    a_tok, b_tok = runs["flashinfer-lite"][0]["tokens"], runs["llama.cpp"][0]["tokens"]
    same = next((i for i, (x, y) in enumerate(zip(a_tok, b_tok, strict=False)) if x != y),
                min(len(a_tok), len(b_tok)))
    return {
        "benchmark": "decode", "model": model, "threads": a.threads,
        "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens,
        "rounds": a.rounds, "file_bytes": file_bytes,
        "llama_cpp_extra_buffers": runs["llama.cpp"][0]["llama_cpp_extra_buffers"],
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count()},
        "summary": summary,
        "ratios": {
            "decode_vs_llama_cpp": ours["decode_tokens_per_s"] / ref["decode_tokens_per_s"],
            "prefill_vs_llama_cpp": ours["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"],
            "load_s_vs_llama_cpp": ours["load_s"] / ref["load_s"],
            "model_rss_vs_file": ours["model_rss_bytes"] / file_bytes,
            "model_load_peak_vs_file": ours["model_load_peak_bytes"] / file_bytes,
            "model_rss_after_vs_file": ours["model_rss_after_bytes"] / file_bytes,
            "llama_cpp_model_rss_vs_file": ref["model_rss_bytes"] / file_bytes,
            "llama_cpp_model_rss_after_vs_file": ref["model_rss_after_bytes"] / file_bytes,
            "resident_weights_vs_file": runs["flashinfer-lite"][0]["resident_bytes"]
            / file_bytes,
        },
        "greedy_tokens_equal_until": same,
        "runs": {e: [{k: v for k, v in x.items() if k != "tokens"} for x in runs[e]]
                 for e in ENGINES},
    }


def plot(reports: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r["model"] for r in reports]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("decode_tokens_per_s", "decode tok/s", 1), ("prefill_tokens_per_s",
                                                            "prefill tok/s", 1),
              ("model_rss_after_bytes", "model RSS held after generating / file size", 0)]
    for ax, (key, title, absolute) in zip(axes, panels, strict=True):
        for k, e in enumerate(ENGINES):
            vals = [r["summary"][e][key] / (1 if absolute else r["file_bytes"]) for r in reports]
            ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, label=e)
        ax.set_xticks(x, names, rotation=15)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"flashinfer-lite vs llama.cpp, {reports[0]['threads']} threads, "
                 f"{reports[0]['prompt_tokens']}-token prompt, medians of "
                 f"{reports[0]['rounds']} alternating rounds")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.models[0], a.threads, a.prompt_tokens, a.decode_tokens)
        return
    runs = {m: {e: [] for e in ENGINES} for m in a.models}
    for r in range(a.rounds):
        for m in a.models:
            for e in ENGINES:
                res = run_child(a, e, m)
                runs[m][e].append(res)
                print(f"round {r} {m} {e}: decode {res['decode_tokens_per_s']:.1f} tok/s, "
                      f"prefill {res['prefill_tokens_per_s']:.1f} tok/s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    reports = []
    for m in a.models:
        rep = report_for(a, m, runs[m])
        reports.append(rep)
        (RESULTS / f"decode_{m}.json").write_text(json.dumps(rep, indent=2))
        print(m, json.dumps(rep["ratios"], indent=2))
    if len(reports) > 1:
        table = [{"model": r["model"], "file_mb": r["file_bytes"] / 1e6,
                  **{f"{e}_{k}": r["summary"][e][k] for e in ENGINES
                     for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "load_s")},
                  **r["ratios"], "greedy_tokens_equal_until": r["greedy_tokens_equal_until"]}
                 for r in reports]
        (RESULTS / "decode_all.json").write_text(json.dumps(
            {"benchmark": "decode", "threads": a.threads, "rounds": a.rounds,
             "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens,
             "table": table}, indent=2))
        plot(reports, RESULTS / "decode_all.png")
        print(f"wrote {RESULTS / 'decode_all.json'} and decode_all.png")


if __name__ == "__main__":
    main()
