"""Decode and prefill speed and peak memory: flashinfer-lite vs llama.cpp, same GGUF, same
thread count, in one run.

Each measurement runs in a fresh child process (so peak RSS belongs to one engine), children
alternate A B A B ..., and the report gives medians and the ratio to llama.cpp.

    python benchmarks/bench_decode.py [--model smollm2-135m] [--rounds 3] [--threads 2]

Writes benchmarks/results/decode_<model>.json.
"""

from __future__ import annotations

import argparse
import json
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
        from llama_cpp import Llama

        from flashinfer_lite.tokenizer import _quiet_stderr

        base = rss_bytes()
        t0 = time.perf_counter()
        with _quiet_stderr():
            llm = Llama(str(path), n_threads=threads, n_threads_batch=threads,
                        n_ctx=prompt_tokens + decode_tokens + 16, n_batch=512, verbose=False)
        load_s = time.perf_counter() - t0
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
                   tokens=tokens)
    out.update(engine=engine, load_s=load_s, prompt_tokens=len(ids), baseline_rss=base,
               peak_rss_bytes=peak_rss_bytes(), rss_after=rss_bytes(),
               file_bytes=path.stat().st_size)
    # tokens after the first are generated one at a time: decode rate excludes the first
    out["decode_tokens_per_s"] = (out["decode_tokens"] - 1) / out["decode_s"]
    out["prefill_tokens_per_s"] = out["prompt_tokens"] / out["prefill_s"]
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.model, a.threads, a.prompt_tokens, a.decode_tokens)
        return
    engines = ["llama.cpp", "flashinfer-lite"]
    runs = {e: [] for e in engines}
    for r in range(a.rounds):
        for e in engines:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", e, "--model", a.model, "--threads",
                 str(a.threads), "--prompt-tokens", str(a.prompt_tokens), "--decode-tokens",
                 str(a.decode_tokens)], capture_output=True, text=True, check=True)
            runs[e].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r} {e}: decode {runs[e][-1]['decode_tokens_per_s']:.1f} tok/s, "
                  f"prefill {runs[e][-1]['prefill_tokens_per_s']:.1f} tok/s", flush=True)

    def med(e, key):
        return statistics.median(x[key] for x in runs[e])

    summary = {e: {k: med(e, k) for k in ("decode_tokens_per_s", "prefill_tokens_per_s",
                                           "peak_rss_bytes", "rss_after", "baseline_rss",
                                           "load_s")}
               for e in engines}
    for e in engines:  # RSS attributable to the model: at its peak, and once generation ended
        summary[e]["model_rss_bytes"] = summary[e]["peak_rss_bytes"] - summary[e]["baseline_rss"]
        summary[e]["model_rss_after_bytes"] = summary[e]["rss_after"] - summary[e]["baseline_rss"]
    ours, ref = summary["flashinfer-lite"], summary["llama.cpp"]
    a_tok, b_tok = runs["flashinfer-lite"][0]["tokens"], runs["llama.cpp"][0]["tokens"]
    same = next((i for i, (x, y) in enumerate(zip(a_tok, b_tok, strict=False)) if x != y),
                min(len(a_tok), len(b_tok)))
    report = {
        "benchmark": "decode", "model": a.model, "threads": a.threads,
        "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens,
        "rounds": a.rounds, "machine": {"platform": platform.platform(),
                                        "processor": platform.processor(),
                                        "cpu_count": __import__("os").cpu_count()},
        "summary": summary,
        "ratios": {
            "decode_vs_llama_cpp": ours["decode_tokens_per_s"] / ref["decode_tokens_per_s"],
            "prefill_vs_llama_cpp": ours["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"],
            "model_rss_vs_llama_cpp": ours["model_rss_bytes"] / ref["model_rss_bytes"],
            "model_rss_after_vs_llama_cpp": ours["model_rss_after_bytes"]
            / ref["model_rss_after_bytes"],
            "resident_weights_vs_file": runs["flashinfer-lite"][0]["resident_bytes"]
            / runs["flashinfer-lite"][0]["file_bytes"],
            "model_rss_vs_file": ours["model_rss_bytes"] / runs["llama.cpp"][0]["file_bytes"],
            "model_rss_after_vs_file": ours["model_rss_after_bytes"]
            / runs["llama.cpp"][0]["file_bytes"],
        },
        "greedy_tokens_equal_until": same,
        "runs": {e: [{k: v for k, v in x.items() if k != "tokens"} for x in runs[e]]
                 for e in engines},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"decode_{a.model}.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["ratios"], indent=2))
    print(f"decode: ours {ours['decode_tokens_per_s']:.1f} tok/s, llama.cpp "
          f"{ref['decode_tokens_per_s']:.1f} tok/s; wrote {out}")


if __name__ == "__main__":
    main()
