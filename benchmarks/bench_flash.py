"""Flash-resident FFN: naive loading vs the skip rule vs + neuron cache vs ours, at several FFN
DRAM shares, page cache dropped before each run; and perplexity dense vs flash.

    python benchmarks/bench_flash.py [--model smollm2-135m] [--shares 0.1 0.25 0.5 1.0]
        [--only speed|quality|frontier]

quality: perplexity over --ppl-tokens (20,000) of the pydoc topics, dense vs each share, plus
the first --decode-tokens scored one token at a time (the decoding path).
frontier: at share 0.25, cold-skip fraction x coalescing gap -> decoding-path perplexity vs
flash bytes and reads per token (the skip rule's quality-vs-I/O curve).

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
    m.flash.reader.drop_page_cache()
    ids = m.tokenize(text()[:20000])[:prompt_tokens]
    t0 = time.perf_counter()
    out = m.generate(ids, max_tokens=gen_tokens, temperature=0.0)
    wall = time.perf_counter() - t0
    s = m.stats
    n = s["generated_tokens"]
    ffn_bytes = m.flash.layout.section * m.config.n_layers
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


def _scorers():
    import numpy as np

    from flashinfer_lite.evaluation import log_softmax

    def ppl(m, ids, window=1024):
        """Scored in windows of `window` tokens (context within each window), prefilled in
        chunks: the FFN sees many rows at once (the prefill path of flash/ffn.py)."""
        nll, count = 0.0, 0
        for s in range(0, len(ids) - 1, window):
            chunk = ids[s : s + window + 1]
            lp = log_softmax(m.logits(chunk)[:-1])
            nll -= lp[np.arange(len(chunk) - 1), chunk[1:]].sum()
            count += len(chunk) - 1
        return float(np.exp(nll / count))

    def decode_ppl(m, ids):
        """Teacher-forced one token at a time: the decoding path (per-token skip rule, pool
        and reads), which is what generation runs."""
        m.prefill_chunk = 1
        lp = log_softmax(m.logits(ids)[:-1])
        return float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))

    return ppl, decode_ppl


def quality_child(model, shares, n_tokens, decode_tokens):
    """Perplexity over n_tokens of the pydoc topics, dense vs flash at each share (skip 0.3),
    and over the first decode_tokens scored on the decoding path."""
    import flashinfer_lite as fl
    from flashinfer_lite.flash.convert import ensure_converted
    from flashinfer_lite.registry import resolve_model

    ppl, decode_ppl = _scorers()
    path = resolve_model(model)
    flash_dir = ensure_converted(path)
    dense = fl.load(path)
    ids = dense.tokenize(text())[:n_tokens]
    out = {"tokens": len(ids), "decode_tokens": decode_tokens, "dense": ppl(dense, ids),
           "dense_decode": decode_ppl(dense, ids[:decode_tokens])}
    dense.close()
    for share in shares:
        for key, score, part in (("", ppl, ids), ("_decode", decode_ppl, ids[:decode_tokens])):
            m = fl.load(flash_dir, ffn_share=share)
            out[f"share_{share}{key}"] = score(m, part)
            m.close()
        print(json.dumps(out), file=sys.stderr, flush=True)
    print(json.dumps(out))


def frontier_child(model, share, n_tokens, colds, gaps):
    """The skip rule's quality against its I/O at one share: cold-skip fraction x coalescing
    gap, scored on the decoding path; bytes and reads per token are exact counts."""
    import flashinfer_lite as fl
    from flashinfer_lite.flash.convert import ensure_converted
    from flashinfer_lite.registry import resolve_model

    _, decode_ppl = _scorers()
    path = resolve_model(model)
    dense = fl.load(path)
    ids = dense.tokenize(text())[:n_tokens]
    out = {"share": share, "tokens": len(ids), "dense_decode": decode_ppl(dense, ids),
           "points": []}
    dense.close()
    flash_dir = ensure_converted(path)
    for cold in colds:
        for gap in gaps:
            m = fl.load(flash_dir, ffn_share=share, cold_skip_fraction=cold, coalesce_gap=gap,
                        vocab_on_flash=False)
            t0 = time.perf_counter()
            p = decode_ppl(m, ids)
            rep, ffn = m.flash_report(), m.flash.layout.section * m.config.n_layers
            out["points"].append({
                "cold_skip_fraction": cold, "coalesce_gap": gap, "decode_ppl": p,
                "ppl_vs_dense": p / out["dense_decode"] - 1,
                "flash_bytes_vs_ffn": rep["flash_bytes_read"] / len(ids) / ffn,
                "flash_reads_per_token": rep["flash_reads"] / len(ids),
                "ffn_active_fraction": rep["ffn_active_fraction"],
                "neuron_cache_hit_rate": rep["neuron_cache_hit_rate"],
                "seconds": time.perf_counter() - t0})
            print(json.dumps(out["points"][-1]), file=sys.stderr, flush=True)
            m.close()
    print(json.dumps(out))


def run(args_list):
    """A child process; its last stdout line is the JSON result, its stderr (progress) is ours."""
    proc = subprocess.run([sys.executable, __file__, *args_list], stdout=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args_list[:3]} failed (exit {proc.returncode}); see above")
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
    ap.add_argument("--decode-tokens", type=int, default=1024,
                    help="tokens scored one at a time (the decoding path) per share")
    ap.add_argument("--only", choices=["speed", "quality", "frontier"],
                    help="run one part and merge it into the existing JSON")
    ap.add_argument("--frontier-tokens", type=int, default=384)
    ap.add_argument("--quality-child", action="store_true")
    ap.add_argument("--frontier-child", action="store_true")
    a = ap.parse_args()
    if a.child:
        child(a.model, float(a.child[0]), a.child[1], a.prompt_tokens, int(a.child[2]),
              a.threads)
        return
    if a.quality_child:
        quality_child(a.model, a.shares, a.ppl_tokens, a.decode_tokens)
        return
    if a.frontier_child:
        frontier_child(a.model, 0.25, a.frontier_tokens, [0.3, 0.4, 0.5], [1024, 4096])
        return
    out = RESULTS / f"flash_{a.model}.json"
    if a.only in ("quality", "frontier"):  # merged into the speed run's JSON
        report = json.loads(out.read_text())
        if a.only == "quality":
            report["quality"] = run(["--quality-child", "--model", a.model, "--ppl-tokens",
                                     str(a.ppl_tokens), "--decode-tokens",
                                     str(a.decode_tokens), "--shares", *map(str, a.shares)])
        else:
            report["frontier"] = run(["--frontier-child", "--model", a.model,
                                      "--frontier-tokens", str(a.frontier_tokens)])
        out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report[a.only], indent=2))
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
    # naive again at the end: the runs are sequential and this machine's speed drifts, so the
    # speed-ups are against the mean of a naive run before and after the others
    plan += [(1.0, "naive", a.gen_tokens)]
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
    naives = [r["decode_tokens_per_s"] for r in runs if r["mode"] == "naive"]
    naive = {"decode_tokens_per_s": sum(naives) / len(naives)}
    summary = {"naive_tokens_per_s_runs": naives, **{f"ours_{r['share']}": {
        "speedup_vs_naive": r["decode_tokens_per_s"] / naive["decode_tokens_per_s"],
        "flash_bytes_vs_ffn": r["flash_bytes_vs_ffn"],
        "peak_rss_minus_baseline": r["peak_rss_bytes"] - r["baseline_rss"]}
        for r in runs if r["mode"] == "ours"}}
    report = {"benchmark": "flash_ffn", "model": a.model, "machine": platform.platform(),
              "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
              "runs": runs, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    if out.exists():  # keep the quality and frontier parts of an earlier run
        old = json.loads(out.read_text())
        report.update({k: old[k] for k in ("quality", "frontier") if k in old})
    out.write_text(json.dumps(report, indent=2))  # speed results survive a failed quality run
    if not a.skip_quality and a.only != "speed":
        report["quality"] = run(["--quality-child", "--model", a.model, "--ppl-tokens",
                                 str(a.ppl_tokens), "--decode-tokens", str(a.decode_tokens),
                                 "--shares", *map(str, a.shares)])
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
                   label="naive (whole FFN read per token; mean of first and last run)")
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
