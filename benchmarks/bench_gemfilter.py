"""GemFilter (Gemma 3 270M by default): pass-key retrieval (full attention vs GemFilter
k=1024 / 2048), needle recall by filter layer, and time to first token + peak RSS, full vs
filtered.

    python benchmarks/bench_gemfilter.py run [--model gemma3-270m]
        [--lengths 2048 4096 8192 16384 32768]
        [--depths 0.1 0.3 0.5 0.7 0.9] [--trials 5] [--trials-at 16384=1 32768=1]
        [--depths-at 32768=0.5] [--speed-lengths 8192 16384 32768] [--keeps 1024 2048]
    python benchmarks/bench_gemfilter.py plot

Accuracy: one full-attention prefill per prompt (the model's own path, prefix reused between
prompts that share one) records every layer's rotated keys and the last token's query, so the
GemFilter scores of *every* layer come from it: pass 1 of layer r is exactly layers 0..r-1 of a
full prefill. Selection and pass 2 then run as the API runs them (filter/gemfilter.py select on
those scores, then generate on the kept ids); that selection is checked against the API's own
pass 1 (`Model.filter_prompt`) on the first prompt of each length that runs it.

Speed and memory: one fresh child process per (length, mode), alternating which mode goes first,
so each peak RSS (VmHWM, reset after load and warm-up) belongs to one call.

Writes benchmarks/results/gemfilter_<model>.json after every step, and .png on `plot`.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kv import passkey_prompt  # noqa: E402  (the pass-key prompt the KV benchmark uses)

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "gemma3-270m"
OUT = RESULTS / f"gemfilter_{MODEL}.json"
GEN_TOKENS = 8  # the 5-digit key (one token per digit in Gemma's vocabulary) and a little more
ROOM = 16  # positions left for the answer under the model's context


def correct(key: int, text: str) -> bool:
    return str(key) in text.replace(" ", "")


def needle_positions(m, ids: list[int], key: int) -> np.ndarray:
    """Positions of the key's tokens (each occurrence) in ids."""
    pat = m.tokenize(str(key), add_bos=False)
    hits = [i for i in range(len(ids) - len(pat) + 1) if ids[i : i + len(pat)] == pat]
    return np.array(sorted({i + j for i in hits for j in range(len(pat))}), np.int64)


class KeyRecorder:
    """Wraps one AttentionCore: records its rotated keys (positions < n) and the query of
    position n-1, then runs the core unchanged."""

    def __init__(self, core, n: int):
        c = core.cfg
        self.core, self.n = core, n
        self.keys = np.zeros((n, c.n_kv_heads, c.head_dim), np.float16)  # (N, Hkv, D)
        self.q_last = None

    def __getattr__(self, name):
        return getattr(self.core, name)

    def __call__(self, q, k, v, cache, positions):
        qr, kr = self.core.rotate(q, k, positions)
        inside = positions < self.n
        self.keys[positions[inside]] = kr[inside]
        last = np.flatnonzero(positions == self.n - 1)
        if len(last):
            self.q_last = qr[last[0]].copy()  # (H, D)
        return self.core(q, k, v, cache, positions)

    def scores(self) -> np.ndarray:
        c = self.core.cfg
        q_sum = self.q_last.reshape(c.n_kv_heads, -1, c.head_dim).sum(axis=1)  # (Hkv, D)
        return np.einsum("skd,kd->s", self.keys.astype(np.float32), q_sum)


def write(result: dict) -> None:
    OUT.parent.mkdir(exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(OUT)


# ---- accuracy ------------------------------------------------------------------------------------
def run_accuracy(m, m2, n: int, depths, trials: int, keeps, rng, check_api: bool,
                 on_progress=None) -> dict:
    """m runs the full prompts (its cache holds the last one, so the next reuses the shared
    prefix, whose recorded keys are copied), m2 the filtered ones. on_progress(partial result)
    after each prompt, so a run cut short keeps what it measured."""
    from flashinfer_lite.filter.gemfilter import default_filter_layer, select, smooth

    layer = default_filter_layer(m.config)
    n_layers = m.config.n_layers
    prompts = []
    for _ in range(trials):
        for depth in sorted(depths, reverse=True):  # deepest first: the next shares more prefix
            prompts.append((rng.randint(10000, 99999), depth))
    rows = []
    m.reset()
    for key, depth in prompts:
        ids = passkey_prompt(m, n - ROOM, key, depth)
        needle = needle_positions(m, ids, key)
        recorders = [KeyRecorder(c, len(ids)) for c in m.net.cores]
        # a reused prefix is not re-run: its keys are the previous prompt's, the same tokens
        if rows and rows[-1]["_recorders"] is not None:
            prev = rows[-1]["_recorders"]
            for r, p in zip(recorders, prev, strict=True):
                common = min(len(p.keys), len(r.keys))
                r.keys[:common] = p.keys[:common]
        m.net.cores[:] = recorders
        try:
            t0 = time.perf_counter()
            full = m.generate(ids, max_tokens=GEN_TOKENS, token_filter=None)
            full_s = time.perf_counter() - t0
            reused = m.stats["prompt_tokens_reused"]
        finally:
            m.net.cores[:] = [r.core for r in recorders]
        row = {"tokens": len(ids), "key": key, "depth": depth, "full_answer": full,
               "full_correct": correct(key, full), "full_s": full_s, "full_reused": reused,
               "needle_tokens": len(needle), "recall": {}, "filtered": {}}
        gf = m.gemfilter
        for k in keeps:
            protected = gf.protected(ids, k)
            row["recall"][k] = []
            for li in range(n_layers):
                kept = select(smooth(recorders[li].scores()), k, protected)
                row["recall"][k].append(float(np.isin(needle, kept).mean()) if len(needle)
                                        else None)
            kept = select(smooth(recorders[layer].scores()), k, protected)
            if len(kept) == len(ids):
                row["filtered"][k] = {"same_as_full": True, "correct": row["full_correct"]}
                continue
            kept_ids = [ids[i] for i in kept]
            t0 = time.perf_counter()
            out = m2.generate(kept_ids, max_tokens=GEN_TOKENS, token_filter=None)
            row["filtered"][k] = {"answer": out, "correct": correct(key, out),
                                  "pass2_s": time.perf_counter() - t0, "kept": len(kept),
                                  "needle_kept": float(np.isin(needle, kept).mean())}
            if check_api and "api_selection_equal" not in row:
                api = m.filter_prompt(ids, keep=k, layer=layer)
                row["api_selection_equal"] = bool(np.array_equal(api.kept, kept))
                row["api_pass1_s"] = api.pass1_s
                check_api = False
        row["_recorders"] = recorders
        if len(rows) >= 1:
            rows[-1]["_recorders"] = None  # keep one prompt's recordings, not all
        rows.append(row)
        print(n, depth, key, "full", row["full_correct"],
              {k: v["correct"] for k, v in row["filtered"].items()},
              f"{full_s:.0f}s reused {reused}", flush=True)
        if on_progress:
            on_progress(accuracy_result(rows, keeps, n_layers, layer))
    return accuracy_result(rows, keeps, n_layers, layer)


def accuracy_result(rows, keeps, n_layers, layer) -> dict:
    rows = [{k: v for k, v in r.items() if k != "_recorders"} for r in rows]
    summary = {"prompts": len(rows), "full_correct": sum(r["full_correct"] for r in rows)}
    for k in keeps:
        summary[f"k{k}_correct"] = sum(r["filtered"][k]["correct"] for r in rows)
        summary[f"k{k}_recall_by_layer"] = [
            float(np.mean([r["recall"][k][li] for r in rows])) for li in range(n_layers)]
    return {"summary": summary, "rows": rows, "filter_layer": layer}


# ---- speed and memory: a fresh child per configuration ----------------------------------------
def read_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def speed_child(n: int, mode: str, key: int, depth: float, keep: int) -> dict:
    import flashinfer_lite as fl
    from flashinfer_lite.memory import release_freed_memory, rss_bytes

    m = fl.load(MODEL, threads=2)
    ids = passkey_prompt(m, n - ROOM, key, depth)
    m.generate(ids[:16], max_tokens=2)  # warm every session
    if mode == "filtered":
        m.filter_prompt(ids[:300], keep=64)  # and the filter's path (token types, RoPE tables)
    m.reset()
    release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of this call only
    before = rss_bytes()
    t0 = time.perf_counter()
    out = m.generate(ids, max_tokens=GEN_TOKENS,
                     token_filter="gemfilter" if mode == "filtered" else None, filter_keep=keep)
    total = time.perf_counter() - t0
    s = m.stats
    return {"mode": mode, "tokens": len(ids), "key": key, "depth": depth, "answer": out,
            "correct": correct(key, out), "ttft_s": s["ttft_s"], "total_s": total,
            "peak_rss_bytes": read_hwm(), "rss_before_bytes": before,
            "kv_bytes": s["kv_bytes"], "filter_pass1_s": s["filter_pass1_s"],
            "filter_pass2_s": s["filter_pass2_s"], "filter_tokens_after": s["filter_tokens_after"]}


def run_speed(n: int, order, key, depth, keep) -> list[dict]:
    rows = []
    for mode in order:
        cmd = [sys.executable, __file__, "_child", "--model", MODEL, "--length", str(n),
               "--mode", mode,
               "--key", str(key), "--depth", str(depth), "--keep", str(keep)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(n, mode, {k: row[k] for k in ("ttft_s", "peak_rss_bytes", "correct")}, flush=True)
    return rows


def speed_summary(rows: list[dict]) -> dict:
    by = {mode: [r for r in rows if r["mode"] == mode] for mode in ("full", "filtered")}
    med = {mode: {"ttft_s": float(np.median([r["ttft_s"] for r in rs])),
                  "peak_rss_bytes": float(np.median([r["peak_rss_bytes"] for r in rs]))}
           for mode, rs in by.items()}
    return {**med, "ttft_speedup": med["full"]["ttft_s"] / med["filtered"]["ttft_s"],
            "peak_rss_reduction": 1 - med["filtered"]["peak_rss_bytes"]
            / med["full"]["peak_rss_bytes"]}


def parse_at(items, cast) -> dict:
    out = {}
    for item in items or []:
        n, v = item.split("=")
        out[int(n)] = [cast(x) for x in v.split(",")]
    return out


def cmd_run(args):
    import flashinfer_lite as fl

    result = json.loads(OUT.read_text()) if args.resume and OUT.exists() else {}
    result.update({"model": MODEL, "machine": platform.machine(), "cpu_threads": 2,
                   "python": platform.python_version(), "args": vars(args),
                   "note": "shared 2-core machine (other jobs running): times are inflated; "
                           "compare ratios within one run"})
    result.setdefault("accuracy", {})
    result.setdefault("speed", {})
    trials_at = {n: v[0] for n, v in parse_at(args.trials_at, int).items()}
    depths_at = parse_at(args.depths_at, float)
    rng = random.Random(args.seed)
    steps = [("accuracy", n) for n in args.lengths] + [("speed", n) for n in args.speed_lengths]
    if args.order:  # e.g. accuracy:2048 speed:8192 ...: what matters most first on a short run
        steps = [(w, int(n)) for w, n in (s.split(":") for s in args.order)]
    m = m2 = None
    for i, (what, n) in enumerate(steps):
        if str(n) in result[what] and args.resume:
            continue
        if what == "accuracy":
            if m is None:
                m, m2 = fl.load(MODEL, threads=2), fl.load(MODEL, threads=2)
            t0 = time.perf_counter()
            depths, trials = depths_at.get(n, args.depths), trials_at.get(n, args.trials)

            def progress(res, n=n, depths=depths, trials=trials, t0=t0):
                res.update(seconds=time.perf_counter() - t0, depths=depths, trials=trials,
                           complete=len(res["rows"]) == len(depths) * trials)
                result["accuracy"][str(n)] = res
                write(result)

            progress(run_accuracy(m, m2, n, depths, trials, args.keeps, rng,
                                  check_api=n in args.check_api_at, on_progress=progress))
        else:
            key, depth = rng.randint(10000, 99999), 0.5
            order = ["full", "filtered"] if i % 2 == 0 else ["filtered", "full"]
            rows = run_speed(n, order, key, depth, args.speed_keep)
            result["speed"][str(n)] = {"rows": rows, "summary": speed_summary(rows)}
        write(result)
        print("wrote", OUT, flush=True)
    plot(result)


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = result.get("accuracy", {})
    lengths = sorted(int(n) for n in acc)
    if lengths:
        fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    else:  # a speed-only run: one panel
        fig, one = plt.subplots(1, 1, figsize=(7, 4.5))
        ax = [None, None, one]
    keeps = result["args"]["keeps"]
    if lengths:
        def frac(n, key):
            s = acc[str(n)]["summary"]
            return s[key] / s["prompts"]

        ax[0].plot(lengths, [frac(n, "full_correct") for n in lengths], "o-", label="full")
        for k in keeps:
            ax[0].plot(lengths, [frac(n, f"k{k}_correct") for n in lengths], "s--",
                       label=f"GemFilter k={k}")
        ax[0].set_xscale("log", base=2)
        ax[0].set_xlabel("prompt tokens")
        ax[0].set_ylabel("pass keys retrieved")
        ax[0].set_ylim(-0.05, 1.05)
        ax[0].set_title(f"Needle in a haystack ({result['model']})")
        ax[0].legend()
        for n in lengths:
            curve = acc[str(n)]["summary"][f"k{keeps[0]}_recall_by_layer"]
            ax[1].plot(range(len(curve)), curve, "o-", label=f"{n} tokens")
        ax[1].set_xlabel("filter layer r")
        ax[1].set_ylabel(f"key tokens in the top {keeps[0]}")
        ax[1].set_title("Needle recall by filter layer")
        ax[1].legend(fontsize=8)
    speed = result.get("speed", {})
    sl = sorted(int(n) for n in speed)
    if sl:
        x = np.arange(len(sl))
        s = [speed[str(n)]["summary"] for n in sl]
        ax[2].bar(x - 0.2, [v["full"]["ttft_s"] for v in s], 0.4, label="full TTFT")
        ax[2].bar(x + 0.2, [v["filtered"]["ttft_s"] for v in s], 0.4, label="GemFilter TTFT")
        ax[2].set_xticks(x, [str(n) for n in sl])
        ax[2].set_ylabel("time to first token (s)")
        twin = ax[2].twinx()
        twin.plot(x, [v["full"]["peak_rss_bytes"] / 1e6 for v in s], "k^-", label="full RSS")
        twin.plot(x, [v["filtered"]["peak_rss_bytes"] / 1e6 for v in s], "kv--",
                  label="GemFilter RSS")
        twin.set_ylabel("peak RSS (MB)")
        top = max(v["full"]["peak_rss_bytes"] for v in s) / 1e6
        twin.set_ylim(0, 1.3 * top)  # from zero: the loaded model is most of either peak
        ax[2].set_title(f"TTFT and peak RSS, k={result['args']['speed_keep']}")
        ax[2].legend(loc="upper left", fontsize=8)
        twin.legend(loc="upper center", fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=110)
    print("wrote", OUT.with_suffix(".png"))


def main():
    global MODEL, OUT
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["run", "plot", "_child"])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--trials-at", nargs="*", help="N=TRIALS, fewer at long lengths")
    p.add_argument("--depths-at", nargs="*", help="N=D1,D2,..., fewer depths at a length")
    p.add_argument("--keeps", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--speed-lengths", type=int, nargs="*", default=[8192, 16384, 32768])
    p.add_argument("--speed-keep", type=int, default=1024)
    p.add_argument("--check-api-at", type=int, nargs="*", default=[2048, 4096])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="skip steps already in the JSON")
    p.add_argument("--order", nargs="*", help="steps to run, in order: accuracy:N speed:N")
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON to write (and the .png); default results/gemfilter_<model>.json")
    # _child
    p.add_argument("--length", type=int)
    p.add_argument("--mode", choices=["full", "filtered"])
    p.add_argument("--key", type=int)
    p.add_argument("--depth", type=float)
    p.add_argument("--keep", type=int, default=1024)
    args = p.parse_args()
    MODEL = args.model
    OUT = args.out or RESULTS / f"gemfilter_{MODEL}.json"
    args.out = str(OUT)
    if args.what == "_child":
        print(json.dumps(speed_child(args.length, args.mode, args.key, args.depth, args.keep)))
    elif args.what == "plot":
        plot(json.loads(OUT.read_text()))
    else:
        cmd_run(args)


if __name__ == "__main__":
    main()
