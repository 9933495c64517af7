"""A model larger than its memory budget: decode speed, flash I/O and peak RSS at budgets below
the file, beside naive offloading and the all-resident model, in one run.

    python benchmarks/bench_offload.py [--model qwen2.5-coder-1.5b] [--budgets 0.4 0.5 0.75]
        [--workloads fresh edit] [--max-tokens 128] [--threads 2]
    python benchmarks/bench_offload.py --quality [--ppl-tokens 256] [--budget 0.5]

Configurations, each in its own child process with the page cache dropped first:
  resident   the GGUF all in DRAM (ONNX Runtime), no budget
  naive      every token reads each layer's whole gate and bundle sections (no pools), drafts
             off: classic offloading, the baseline the budgets are compared with
  <f>        memory_budget = f x the GGUF's size: the planner's split (gate rows held, pools,
             vocabulary on flash), drafts as the API defaults them (prompt lookup, 8 tokens)
             (a budget below the floor is recorded with the planner's refusal)
  <f>-nodraft  the same without drafts (the edit workloads: same greedy output?)
  <f>-prefetch the same with prefetch=True (layer-ahead reads predicted from the residual)
Workloads (chat-templated, greedy; benchmarks/bench_speculative.py holds their messages):
fresh (write a new function; ~40-token prompt), edit (rename a class in ~1.5k tokens of code
the answer repeats), edit_small (add type hints to a quoted class, ~0.5k tokens).

Per generated token (decode only; prefill is reported as TTFT): tok/s, flash bytes and reads
(exact counts, gate rows included), mean read size, achieved MB/s of the bundle reads against
the disk probe's curve at that size and depth (benchmarks/probe_disk.py), the I/O / memory
management / compute split, and how much of the gate's read time was hidden behind compute;
peak RSS over the child's baseline (interpreter, numpy, ONNX Runtime, llama.cpp's library, the
numba kernels: the runtime before any model byte is read).

--quality: perplexity on the decoding path (one token at a time: the per-token skip rule,
pools and reads) over --ppl-tokens of the pydoc topics at --budget, against the all-resident
model on the same tokens.

Writes benchmarks/results/offload_<model>.json (after every child: a crash keeps what
finished) and offload_<model>.png (tok/s against the budget).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _baseline():
    """Load the runtime's libraries and kernels; returns the RSS they leave."""
    import llama_cpp  # noqa: F401
    import onnxruntime  # noqa: F401

    from flashinfer_lite.kernels import bundle_ffn
    from flashinfer_lite.memory import rss_bytes

    bundle_ffn.warm()
    return rss_bytes()


def _drop_cache(path: Path) -> None:
    for p in ([path] if path.is_file() else sorted(path.iterdir())):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child(model: str, config: str, workload: str, max_tokens: int, threads: int,
          kv_cache: str, kv_reserve: int) -> dict:
    from bench_speculative import workloads

    import flashinfer_lite as fl
    from flashinfer_lite.flash.convert import ensure_converted
    from flashinfer_lite.loaders.disk_curve import load_curve
    from flashinfer_lite.memory import peak_rss_bytes
    from flashinfer_lite.registry import resolve_model

    path = resolve_model(model)
    flash_dir = ensure_converted(path)
    base = _baseline()
    size = path.stat().st_size
    drafts = 0 if config in ("naive", "resident") or config.endswith("-nodraft") else None
    if config == "resident":
        _drop_cache(path)
        m = fl.load(path, threads=threads, kv_cache=kv_cache)
    else:
        _drop_cache(flash_dir)
        frac = 0.5 if config == "naive" else float(config.split("-")[0])
        try:
            m = fl.load(flash_dir, threads=threads, memory_budget=int(frac * size),
                        ffn_mode="naive" if config == "naive" else "ours", kv_cache=kv_cache,
                        kv_reserve_tokens=kv_reserve, prefetch=config.endswith("-prefetch"))
        except fl.BudgetError as exc:  # below the floor: a result, not a failure
            print(json.dumps({"config": config, "workload": workload, "refused": str(exc)}))
            return
    ids = m.apply_chat_template(workloads()[workload])
    kw = {} if drafts is None else {"num_draft_tokens": drafts}
    t0 = time.perf_counter()
    text = m.generate(ids, max_tokens=max_tokens, temperature=0.0, **kw)
    wall = time.perf_counter() - t0
    s = m.stats
    r = {"config": config, "workload": workload, "kv_cache": kv_cache,
         "kv_reserve_tokens": kv_reserve, "prompt_tokens": len(ids),
         "generated": s["generated_tokens"], "decode_tokens_per_s": s["tokens_per_s"],
         "ttft_s": s["ttft_s"], "wall_s": wall, "baseline_rss": base,
         "peak_rss_over_baseline": peak_rss_bytes() - base, "file_bytes": size,
         "text": text}
    for k in ("spec_tokens_per_pass", "spec_passes", "spec_drafted", "spec_accepted"):
        if k in s:
            r[k] = s[k]
    if m.flash is not None:
        rep = m.flash_report()
        per = {k: s.get(f"{k}_per_token") for k in (
            "flash_bytes_read", "flash_reads", "io_s", "memory_management_s", "compute_s",
            "vocab_bytes_read", "vocab_reads", "gate_bytes_read", "gate_wait_s",
            "gate_compute_s")}
        bundle_bytes = rep["flash_bytes_read"] - rep["gate_bytes_read"]
        bundle_reads = rep["flash_reads"] - rep["gate_reads"]
        reader = m.flash.reader
        mean = bundle_bytes / bundle_reads if bundle_reads else 0
        curve = load_curve(engine="python")
        r.update({
            "plan": m.plan.as_dict() if m.plan is not None else None,
            "ffn_bytes": (m.flash.layout.section + m.flash.layout.gate_section)
            * m.config.n_layers,
            **{f"{k}_per_token": v for k, v in per.items()},
            "mean_bundle_read_bytes": mean,
            "bundle_read_MBps": bundle_bytes / reader.seconds / 1e6 if reader.seconds else None,
            "probe_MBps_at_size": (curve.bandwidth(int(mean), reader.threads) / 1e6
                                   if curve is not None and mean else None),
            "gate_read_MBps": (rep["gate_bytes_read"] / rep["gate_read_s"] / 1e6
                               if rep["gate_read_s"] else None),
            "gate_read_hidden_share": (1 - rep["gate_wait_s"] / rep["gate_read_s"]
                                       if rep["gate_read_s"] else None),
            "neuron_cache_hit_rate": rep["neuron_cache_hit_rate"],
            "ffn_active_fraction": rep["ffn_active_fraction"],
            "prefetch_bytes_read": rep["prefetch_bytes_read"],
            "prefetch_hit_rate": rep["prefetch_hit_rate"],
            "resident_rss_bytes": m.resident_rss_bytes, "pool_bytes": rep["pool_bytes"],
            "read_mode": rep["flash_read_mode"]})
    print(json.dumps(r))


def quality_child(model: str, budget: float, n_tokens: int, threads: int):
    import numpy as np

    import flashinfer_lite as fl
    from flashinfer_lite.evaluation import log_softmax, topics_text
    from flashinfer_lite.flash.convert import ensure_converted
    from flashinfer_lite.registry import resolve_model

    def decode_ppl(m, ids):
        lp = log_softmax(m.logits(ids)[:-1])
        return float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))

    path = resolve_model(model)
    # the budgeted model first: its planner measures the resident part as RSS growth, which
    # a dense model loaded and freed before would blur
    # prefill_chunk=1: one token per forward, the decoding path
    m = fl.load(ensure_converted(path), threads=threads, prefill_chunk=1,
                memory_budget=int(budget * path.stat().st_size), kv_reserve_tokens=n_tokens)
    ids = m.tokenize(topics_text())[:n_tokens]
    out = {"tokens": len(ids), "budget": budget, "flash": decode_ppl(m, ids)}
    m.close()
    out["resident"] = decode_ppl(fl.load(path, threads=threads, prefill_chunk=1), ids)
    out["ppl_vs_resident"] = out["flash"] / out["resident"] - 1
    print(json.dumps(out))


def run(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed (exit {proc.returncode}); see above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(report: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for wl, marker in (("fresh", "o-"), ("edit", "s-"), ("edit_small", "^-")):
        rows = sorted((r for r in report["runs"] if r["workload"] == wl and "refused" not in r
                       and r["config"][0].isdigit() and "-" not in r["config"]),
                      key=lambda r: float(r["config"]))
        if rows:
            ax.plot([float(r["config"]) for r in rows],
                    [r["decode_tokens_per_s"] for r in rows], marker, label=f"ours, {wl}")
        for cfg, style in (("naive", ":"), ("resident", "--")):
            ref = [r for r in report["runs"] if r["workload"] == wl and r["config"] == cfg]
            if ref:
                ax.axhline(ref[0]["decode_tokens_per_s"], ls=style, lw=1,
                           color="gray" if cfg == "naive" else "black",
                           label=f"{cfg}, {wl}")
    ax.set_xlabel("memory budget / file size")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.set_title(f"{report['model']}: weights on flash, cold page cache")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.5, 0.75])
    ap.add_argument("--workloads", nargs="+", default=["fresh", "edit"])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-cache", default="f16", help="every configuration's KV cache kind")
    ap.add_argument("--kv-reserve-tokens", type=int, default=1024,
                    help="positions the planner reserves KV cache for (the prompt's and answer's)")
    ap.add_argument("--configs", nargs="+", default=None,
                    help="run only these configurations (naive, a budget, resident, "
                         "0.5-nodraft, 0.75-prefetch)")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--ppl-tokens", type=int, default=256)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "WORKLOAD"))
    ap.add_argument("--quality-child", action="store_true")
    a = ap.parse_args()
    if a.child:
        child(a.model, a.child[0], a.child[1], a.max_tokens, a.threads, a.kv_cache,
              a.kv_reserve_tokens)
        return
    if a.quality_child:
        quality_child(a.model, a.budget, a.ppl_tokens, a.threads)
        return
    out = RESULTS / f"offload_{a.model}.json"
    report = json.loads(out.read_text()) if out.exists() else {}
    report.update({"benchmark": "offload", "model": a.model, "machine": platform.platform(),
                   "threads": a.threads, "max_tokens": a.max_tokens})
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.quality:
        report["quality"] = run(["--quality-child", "--model", a.model, "--budget",
                                 str(a.budget), "--ppl-tokens", str(a.ppl_tokens),
                                 "--threads", str(a.threads)])
        out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report["quality"], indent=2))
        return
    configs = ["naive", *map(str, a.budgets), "resident"]
    plan = [(wl, cfg) for wl in a.workloads for cfg in (a.configs or configs + (
        ["0.5-nodraft"] if wl.startswith("edit") and 0.5 in a.budgets else []))]
    # other runs stay (one command per workload, or per configuration, can build the file)
    report["runs"] = [r for r in report.get("runs", [])
                      if (r["workload"], r["config"]) not in plan]
    for wl, cfg in plan:
        r = run(["--child", cfg, wl, "--model", a.model, "--max-tokens",
                 str(a.max_tokens), "--threads", str(a.threads), "--kv-cache", a.kv_cache,
                 "--kv-reserve-tokens", str(a.kv_reserve_tokens)])
        report["runs"].append(r)
        out.write_text(json.dumps(report, indent=2))
        if "refused" in r:
            print(f"{wl:>5} {cfg:>12}: {r['refused']}", flush=True)
            continue
        mb = (r.get("flash_bytes_read_per_token") or 0) / 1e6
        print(f"{wl:>5} {cfg:>12}: {r['decode_tokens_per_s']:.2f} tok/s, "
              f"{mb:.0f} MB/token from flash, peak RSS over baseline "
              f"{r['peak_rss_over_baseline'] / 1e6:.0f} MB, ttft {r['ttft_s']:.1f} s",
              flush=True)
    plot(report, RESULTS / f"offload_{a.model}.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
