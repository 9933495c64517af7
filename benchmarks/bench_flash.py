"""Flash-resident FFN: naive loading vs the skip rule vs + neuron cache vs ours, at several FFN
DRAM shares, page cache dropped before each run; and perplexity dense vs flash.

    python benchmarks/bench_flash.py [--model smollm2-135m] [--shares 0.1 0.25 0.5 1.0]

Each configuration runs in its own child process (peak RSS is its own). Modes (flash/ffn.py):
  naive  every token reads each layer's whole FFN section
  skip   the skip rule, active bundles read every token, up row and down column separately
  cache  + the neuron pool with windowing
  ours   + bundled reads coalesced into large aligned reads
  ours+prefetch  + the next layer's likely misses read on a background thread (share 0.25)
naive and skip do not depend on the share (nothing is cached), so they run once.
Writes benchmarks/results/flash_<model>.json and flash_<model>.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def text():
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def child(model, share, mode, prompt_tokens, gen_tokens, threads):
    import flashinfer_lite as fl
    from flashinfer_lite.flash.convert import ensure_converted
    from flashinfer_lite.memory import peak_rss_bytes, rss_bytes
    from flashinfer_lite.registry import resolve_model

    flash_dir = ensure_converted(resolve_model(model))
    import llama_cpp  # noqa: F401  (libraries in the baseline)
    import numba  # noqa: F401
    import onnxruntime  # noqa: F401

    base = rss_bytes()
    prefetch = mode.endswith("+prefetch")  # ours with the background prefetch (flash/ffn.py)
    m = fl.load(flash_dir, ffn_share=share, ffn_mode=mode.split("+")[0], threads=threads,
                prefetch=prefetch)
    m._flash.reader.drop_page_cache()
    ids = m.tokenize(text()[:20000])[:prompt_tokens]
    t0 = time.perf_counter()
    out = m.generate(ids, max_tokens=gen_tokens, temperature=0.0)
    wall = time.perf_counter() - t0
    s = m.stats
    n = s["generated_tokens"]
    ffn_bytes = m._flash.layout.section * m.config.n_layers
    r = {
        "model": model, "share": share, "mode": mode, "generated": n,
        "decode_tokens_per_s": s["tokens_per_s"], "ttft_s": s["ttft_s"], "wall_s": wall,
        "io_ms_per_token": 1e3 * s["io_s_per_token"],
        "memory_management_ms_per_token": 1e3 * s["memory_management_s_per_token"],
        "compute_ffn_ms_per_token": 1e3 * s["compute_s_per_token"],
        "flash_bytes_per_token": s["flash_bytes_read_per_token"],
        "flash_reads_per_token": s["flash_reads_per_token"],
        "mean_read_bytes": (s["flash_bytes_read_per_token"] / s["flash_reads_per_token"]
                            if s["flash_reads_per_token"] else 0),
        "ffn_bytes": ffn_bytes,
        "flash_bytes_vs_ffn": s["flash_bytes_read_per_token"] / ffn_bytes,
        "neuron_cache_hit_rate": s["neuron_cache_hit_rate"],
        "ffn_active_fraction": s["ffn_active_fraction"], "read_mode": s["flash_read_mode"],
        "pool_bytes": s["pool_bytes"], "resident_bytes": m.resident_bytes,
        "baseline_rss": base, "peak_rss_bytes": peak_rss_bytes(),
        "text": out[:120],
    }
    print(json.dumps(r))


def quality_child(model, shares, n_tokens, skips):
    """Perplexity over n_tokens of the pydoc topics: dense, flash at each share (skip 0.3),
    and the skip rule's quality-vs-I/O curve at share 1.0."""
    import numpy as np

    import flashinfer_lite as fl
    from flashinfer_lite.evaluation import log_softmax
    from flashinfer_lite.flash.convert import ensure_converted
    from flashinfer_lite.registry import resolve_model

    path = resolve_model(model)
    flash_dir = ensure_converted(path)

    def ppl(m, ids, window=1024):
        """Scored in windows of `window` tokens (context within each window)."""
        nll, count = 0.0, 0
        for s in range(0, len(ids) - 1, window):
            chunk = ids[s : s + window + 1]
            lp = log_softmax(m.logits(chunk)[:-1])
            nll -= lp[np.arange(len(chunk) - 1), chunk[1:]].sum()
            count += len(chunk) - 1
        return float(np.exp(nll / count))

    dense = fl.load(path)
    ids = dense.tokenize(text())[:n_tokens]
    out = {"tokens": len(ids), "dense": ppl(dense, ids)}
    dense.close()
    for share in shares:
        m = fl.load(flash_dir, ffn_share=share)
        out[f"share_{share}"] = ppl(m, ids)
        m.close()
    curve = []
    for skip in skips:
        m = fl.load(flash_dir, ffn_share=1.0, skip_fraction=skip)
        p = ppl(m, ids[:4096])
        rep = m.flash_report()
        curve.append({"skip_fraction": skip, "ppl_4k": p,
                      "active_fraction": rep["ffn_active_fraction"]})
        m.close()
    d4 = fl.load(path)
    out["dense_4k"] = ppl(d4, ids[:4096])
    out["skip_curve"] = curve
    print(json.dumps(out))


def run(args_list):
    proc = subprocess.run([sys.executable, __file__, *args_list], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens-slow", type=int, default=16,
                    help="tokens for the per-neuron-read ablations (skip, cache)")
    ap.add_argument("--ppl-tokens", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("SHARE", "MODE", "GEN"))
    ap.add_argument("--quality-child", action="store_true")
    a = ap.parse_args()
    if a.child:
        child(a.model, float(a.child[0]), a.child[1], a.prompt_tokens, int(a.child[2]),
              a.threads)
        return
    if a.quality_child:
        quality_child(a.model, a.shares, a.ppl_tokens, [0.1, 0.2, 0.3, 0.4, 0.5])
        return
    common = ["--model", a.model, "--prompt-tokens", str(a.prompt_tokens), "--threads",
              str(a.threads)]
    from flashinfer_lite.flash.convert import ensure_converted
    from flashinfer_lite.registry import resolve_model

    ensure_converted(resolve_model(a.model))
    runs = []
    plan = [(1.0, "naive", a.gen_tokens), (1.0, "skip", a.gen_tokens_slow)]
    plan += [(s, "cache", a.gen_tokens_slow) for s in a.shares]
    plan += [(s, "ours", a.gen_tokens) for s in a.shares]
    plan += [(0.25, "ours+prefetch", a.gen_tokens)] if 0.25 in a.shares else []
    for share, mode, gen in plan:
        r = run(["--child", str(share), mode, str(gen), *common])
        runs.append(r)
        print(f"{mode:>5} share {share:.2f}: {r['decode_tokens_per_s']:.2f} tok/s, "
              f"{r['flash_bytes_per_token'] / 1e6:.2f} MB/token "
              f"({r['flash_bytes_vs_ffn']:.0%} of FFN), {r['flash_reads_per_token']:.0f} "
              f"reads/token, io {r['io_ms_per_token']:.1f} ms, mm "
              f"{r['memory_management_ms_per_token']:.1f} ms, ffn compute "
              f"{r['compute_ffn_ms_per_token']:.1f} ms, hit {r['neuron_cache_hit_rate']}",
              flush=True)
    naive = next(r for r in runs if r["mode"] == "naive")
    summary = {f"ours_{r['share']}": {
        "speedup_vs_naive": r["decode_tokens_per_s"] / naive["decode_tokens_per_s"],
        "flash_bytes_vs_ffn": r["flash_bytes_vs_ffn"],
        "peak_rss_minus_baseline": r["peak_rss_bytes"] - r["baseline_rss"]}
        for r in runs if r["mode"] == "ours"}
    report = {"benchmark": "flash_ffn", "model": a.model, "machine": platform.platform(),
              "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
              "runs": runs, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"flash_{a.model}.json"
    out.write_text(json.dumps(report, indent=2))  # speed results survive a failed quality run
    if not a.skip_quality:
        report["quality"] = run(["--quality-child", "--model", a.model, "--ppl-tokens",
                                 str(a.ppl_tokens), "--shares", *map(str, a.shares)])
        out.write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ours = [r for r in runs if r["mode"] == "ours"]
        cache = [r for r in runs if r["mode"] == "cache"]
        ax.plot([r["share"] for r in ours], [r["decode_tokens_per_s"] for r in ours], "o-",
                label="ours (skip + cache + bundled, coalesced reads)")
        ax.plot([r["share"] for r in cache], [r["decode_tokens_per_s"] for r in cache], "s--",
                label="skip + cache, per-neuron reads")
        ax.axhline(naive["decode_tokens_per_s"], color="gray", ls=":",
                   label="naive (whole FFN read per token)")
        ax.set_xlabel("FFN share held in DRAM")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{a.model}: flash-resident FFN, cold page cache")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / f"flash_{a.model}.png", dpi=110)
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
