"""GemFilter on a GPU (MLX backend): pass-key retrieval over the full grid, full attention vs
GemFilter k=1024 / 2048, with time to first token and peak memory of every call.

Three steps, because the GPU machine has no llama.cpp (our tokenizer) and no network:

    python benchmarks/bench_gemfilter_mlx.py prepare --out DIR   # here: DIR/prompts.json.gz
    python benchmarks/bench_gemfilter_mlx.py run --model X.gguf --prompts DIR/prompts.json.gz \
        --out OUT.json                                            # GPU machine (resumable)
    python benchmarks/bench_gemfilter_mlx.py finish OUT.json      # here: decode the answers,
        # score them, summarize -> results/gemfilter_gemma3-270m_mlx_gpu.json and .png

`prepare` builds every pass-key prompt (bench_kv.passkey_prompt: filler text, 5-digit key at a
depth, the question last) for 2k, 4k, 8k, 16k and 32k tokens x 5 depths x 5 trials, with the
real tokenizer, and stores the ids, the text of each token they use (GemFilter's protected
question line reads token text), the end-of-generation ids and each key's token ids.

`run` serves those through a lookup tokenizer and, for each prompt, in one process on one
backend: full attention (`token_filter=None`), then GemFilter k=1024 and k=2048 through the
public API (`m.stream(ids, token_filter="gemfilter", filter_keep=k)`: pass 1 on the GPU, the
selection, pass 2 on the kept ids). Every call starts from an empty cache (`m.reset()`), so each
is a whole prefill; it records the generated ids, TTFT (pass 1 + pass 2 for GemFilter), MLX's
peak device memory (`mx.reset_peak_memory` before the call) and the host's peak RSS (VmHWM reset
before the call). Prompts run trial-major (every length once, then again), so a run cut short
has the same number of trials at every length; the first prompt of each length runs once
untimed first (MLX compiles kernels for each new input shape). A second GemFilter k=2048 call
is skipped where the prompt fits in 2048 tokens (it would be the full call).

`finish` detokenizes the answers with the real tokenizer; a prompt is correct when the key
appears in the 8 generated tokens' text (bench_gemfilter.correct).
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from gpu_lookup import install_lookup_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "gemma3-270m"  # the default --name
GEN_TOKENS = 8
ROOM = 16  # as bench_gemfilter: positions left for the answer under the model's context


# ---- prepare (here, with llama.cpp) ---------------------------------------------------------
class _TokOnly:
    """What bench_kv.passkey_prompt needs of a Model: tokenize."""

    def __init__(self, tok):
        self.tok = tok

    def tokenize(self, text, add_bos=True):
        return self.tok.encode(text, add_bos=add_bos)


def prepare(out_dir: Path, lengths, depths, trials, seed, name: str = MODEL) -> Path:
    import llama_cpp
    from bench_kv import passkey_prompt

    from flashinfer_lite.registry import resolve_model
    from flashinfer_lite.tokenizer import Tokenizer

    tok = Tokenizer(resolve_model(name))
    m = _TokOnly(tok)
    rng = random.Random(seed)
    prompts, used = [], set()
    for trial in range(trials):
        for n in lengths:
            for depth in depths:
                key = rng.randint(10000, 99999)
                ids = passkey_prompt(m, n - ROOM, key, depth)
                used.update(ids)
                key_ids = tok.encode(str(key), add_bos=False)
                hits = [i for i in range(len(ids) - len(key_ids) + 1)
                        if ids[i : i + len(key_ids)] == key_ids]
                needle = sorted({i + j for i in hits for j in range(len(key_ids))})
                prompts.append({"n": n, "trial": trial, "depth": depth, "key": key,
                                "ids": ids, "key_ids": key_ids, "needle": needle})
    vocab = tok._llama._model.vocab
    eog = [t for t in range(tok.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    table = {"model": name, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "n_vocab": tok.n_vocab,
             "eog": eog, "token_text": {str(t): tok.token_text(t) for t in sorted(used)},
             "prompts": prompts, "lengths": lengths, "depths": depths, "trials": trials,
             "seed": seed}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "prompts.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump(table, fh)
    print(f"wrote {path}: {len(prompts)} prompts, {len(used)} distinct tokens")
    return path


# ---- run (GPU machine) -----------------------------------------------------------------------
def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def modes(keeps, q4_keeps) -> dict:
    """Each measured configuration's name -> (keep, q4 cache): full attention (f16 cache),
    GemFilter at each keep, GemFilter with a q4 cache at each q4 keep."""
    out = {"full": (None, False)}
    out.update({f"k{k}": (k, False) for k in keeps})
    out.update({f"k{k}_q4": (k, True) for k in q4_keeps})
    return out


def _call(m, mx, ids, keep: int | None, capture: dict) -> dict:
    """One whole prefill + GEN_TOKENS greedy tokens; keep None = full attention."""
    m.reset()
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    Path("/proc/self/clear_refs").write_text("5")
    capture.clear()
    t0 = time.perf_counter()
    kw = {"token_filter": None} if keep is None else {"token_filter": "gemfilter",
                                                        "filter_keep": keep}
    out = []
    for chunk in m.stream(ids, max_tokens=GEN_TOKENS, temperature=0.0, **kw):
        if chunk.token is not None:
            out.append(int(chunk.token))
    total = time.perf_counter() - t0
    s = m.stats
    row = {"ids": out, "ttft_s": s["ttft_s"], "total_s": total,
           "decode_tokens_per_s": s["tokens_per_s"],
           "peak_device_bytes": int(mx.get_peak_memory()), "peak_rss_bytes": _hwm(),
           "filter_pass1_s": s["filter_pass1_s"], "filter_pass2_s": s["filter_pass2_s"],
           "tokens_after": s["filter_tokens_after"], "filter_layer": s["filter_layer"]}
    if "result" in capture:
        row["kept"] = capture["result"].kept
    return row


def _contains(seq, pat) -> bool:
    return any(seq[i : i + len(pat)] == pat for i in range(len(seq) - len(pat) + 1))


def run(model: str, prompts_path: str, out_path: str, keeps, limit_s: float,
        check_tokens: int, q4_keeps=()) -> None:
    with gzip.open(prompts_path, "rt") as fh:
        table = json.load(fh)
    install_lookup_tokenizer(table)
    import mlx.core as mx

    import flashinfer_lite as fl

    out = Path(out_path)
    result = json.loads(out.read_text()) if out.exists() else None
    if result is None:
        import subprocess

        try:
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
        except Exception:
            gpu = None
        result = {"model": table.get("model", MODEL), "backend": "mlx", "gpu": gpu,
                  "host": platform.node(), "python": sys.version.split()[0],
                  "mlx": mx.__version__, "keeps": keeps, "q4_keeps": list(q4_keeps),
                  "gen_tokens": GEN_TOKENS, "rows": [], "warmups": {},
                  "lengths": table["lengths"], "depths": table["depths"],
                  "trials": table["trials"], "seed": table["seed"]}
    t_start = time.perf_counter()
    m = fl.load(model, backend="mlx")
    # the q4 cache lives on the host (kernels/mlx_attention.py): a second model holds it
    m_q4 = fl.load(model, backend="mlx", kv_cache="q4") if q4_keeps else None
    result["device"] = str(mx.default_device())
    result["prefill_chunk"] = m.prefill_chunk
    capture: dict = {}
    real = m.filter_prompt

    def filter_prompt(*a, **kw):  # the API's own pass 1, its kept indices recorded
        capture["result"] = real(*a, **kw)
        return capture["result"]

    m.filter_prompt = filter_prompt
    if m_q4 is not None:
        real_q4 = m_q4.filter_prompt

        def filter_prompt_q4(*a, **kw):
            capture["result"] = real_q4(*a, **kw)
            return capture["result"]

        m_q4.filter_prompt = filter_prompt_q4
    configs = modes(keeps, q4_keeps)
    if check_tokens and "check_vs_onnxruntime" not in result:
        result["check_vs_onnxruntime"] = check_vs_ort(model, m, table["prompts"][0]["ids"],
                                                      check_tokens)
        print("check", result["check_vs_onnxruntime"], flush=True)
        _write(out, result)
    done = {(r["n"], r["trial"], r["depth"]) for r in result["rows"]}
    for p in table["prompts"]:
        if (p["n"], p["trial"], p["depth"]) in done:
            continue
        if time.perf_counter() - t_start > limit_s:
            print("time limit reached", flush=True)
            break
        ids, n = p["ids"], p["n"]
        if str(n) not in result["warmups"]:  # compile this length's shapes, untimed
            t0 = time.perf_counter()
            for keep, q4 in configs.values():
                if keep is None or len(ids) > keep:
                    _call(m_q4 if q4 else m, mx, ids, keep, capture)
            result["warmups"][str(n)] = time.perf_counter() - t0
        row = {k: p[k] for k in ("n", "trial", "depth", "key")}
        row["tokens"] = len(ids)
        for name, (keep, q4) in configs.items():
            if keep is not None and len(ids) <= keep:
                row[name] = {"same_as_full": True}
                continue
            r = _call(m_q4 if q4 else m, mx, ids, keep, capture)
            kept = r.pop("kept", None)
            if kept is not None and p["needle"]:
                r["needle_kept"] = float(np.isin(p["needle"], kept).mean())
            r["key_in_ids"] = _contains(r["ids"], p["key_ids"])
            row[name] = r
        result["rows"].append(row)
        f = row["full"]
        print(n, row["trial"], row["depth"], "full", f["key_in_ids"], f"{f['ttft_s']:.2f}s",
              *[(k, row[k].get("key_in_ids"), round(row[k].get("ttft_s", 0), 2))
                for k in configs if k != "full"], flush=True)
        _write(out, result)
    print(f"wrote {out}: {len(result['rows'])} of {len(table['prompts'])} prompts", flush=True)


def check_vs_ort(model: str, gpu, ids, n: int) -> dict:
    """The last position's logits after n prompt tokens: MLX (this device) vs ONNX Runtime on
    the host CPU, both through the model's chunked prompt path."""
    import flashinfer_lite as fl

    _cap_onnx_ir_version()
    ids = ids[:n]
    gpu.reset()
    a = np.asarray(gpu.runner(gpu.prompt_cache, ids), np.float32)
    gpu.reset()
    cpu = fl.load(model, backend="onnxruntime")
    t0 = time.perf_counter()
    b = np.asarray(cpu.runner(cpu.prompt_cache, ids), np.float32)
    cpu_s = time.perf_counter() - t0
    cpu.close()
    top_a, top_b = np.argsort(-a)[:5], np.argsort(-b)[:5]
    return {"tokens": n, "top1_equal": bool(top_a[0] == top_b[0]),
            "top5_mlx": top_a.tolist(), "top5_onnxruntime": top_b.tolist(),
            "max_abs_diff": float(np.abs(a - b).max()),
            "logit_scale": float(np.abs(b).max()), "onnxruntime_s": cpu_s}


def _cap_onnx_ir_version(cap: int = 10) -> None:
    """The GPU machine's onnxruntime reads IR versions older than its onnx writes
    (bench_mlx._cap_onnx_ir_version)."""
    from bench_mlx import _cap_onnx_ir_version as cap_ir

    cap_ir(cap)


def _write(out: Path, result: dict) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)


# ---- finish (here) ---------------------------------------------------------------------------
def finish(raw_path: str, out: Path | None) -> None:
    from bench_gemfilter import correct

    from flashinfer_lite.registry import resolve_model
    from flashinfer_lite.tokenizer import Tokenizer

    result = json.loads(Path(raw_path).read_text())
    tok = Tokenizer(resolve_model(result["model"]))
    names = list(modes(result["keeps"], result.get("q4_keeps", [])))
    for row in result["rows"]:
        for mode in names:
            r = row[mode]
            if r.get("same_as_full"):
                continue
            r["answer"] = tok.decode(r["ids"])
            r["correct"] = correct(row["key"], r["answer"])
        for mode in names:
            if row[mode].get("same_as_full"):
                row[mode]["correct"] = row["full"]["correct"]
    out = out or RESULTS / f"gemfilter_{result['model']}_mlx_gpu.json"
    result["summary"] = summarize(result)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    print(json.dumps(result["summary"], indent=1))
    plot(result, out.with_suffix(".png"))


def summarize(result: dict) -> dict:
    names = [m for m in modes(result["keeps"], result.get("q4_keeps", [])) if m != "full"]
    by_n: dict = {}
    for row in result["rows"]:
        by_n.setdefault(row["n"], []).append(row)
    summary = {}
    for n, rows in sorted(by_n.items()):
        s = {"tokens": rows[0]["tokens"], "prompts": len(rows),
             "trials": len({r["trial"] for r in rows}),
             "depths": sorted({r["depth"] for r in rows}),
             "full_correct": sum(r["full"]["correct"] for r in rows)}
        measured = ["full"]
        for k in names:
            s[f"{k}_correct"] = sum(r[k]["correct"] for r in rows)
            filtered = [r[k] for r in rows if not r[k].get("same_as_full")]
            if filtered:
                measured.append(k)
                s[f"{k}_needle_kept"] = float(np.mean([f.get("needle_kept", np.nan)
                                                       for f in filtered]))
            else:
                s[f"{k}_note"] = f"the prompt fits in {k}'s keep: it keeps it whole"
        by_depth = {}
        for d in s["depths"]:
            rs = [r for r in rows if r["depth"] == d]
            by_depth[str(d)] = {m: sum(r[m]["correct"] for r in rs) for m in ["full", *names]}
            by_depth[str(d)]["prompts"] = len(rs)
        s["by_depth"] = by_depth
        for name in measured:
            rs = [r[name] for r in rows]
            s[f"{name}_ttft_s_median"] = statistics.median(x["ttft_s"] for x in rs)
            s[f"{name}_peak_device_bytes_median"] = statistics.median(
                x["peak_device_bytes"] for x in rs)
            s[f"{name}_peak_rss_bytes_median"] = statistics.median(
                x["peak_rss_bytes"] for x in rs)
            if name != "full":
                s[f"{name}_pass1_s_median"] = statistics.median(x["filter_pass1_s"] for x in rs)
                s[f"{name}_pass2_s_median"] = statistics.median(x["filter_pass2_s"] for x in rs)
                s[f"{name}_ttft_speedup"] = s["full_ttft_s_median"] / s[f"{name}_ttft_s_median"]
                s[f"{name}_peak_device_lower_by"] = 1 - (s[f"{name}_peak_device_bytes_median"]
                                                         / s["full_peak_device_bytes_median"])
                s[f"{name}_peak_rss_lower_by"] = 1 - (s[f"{name}_peak_rss_bytes_median"]
                                                      / s["full_peak_rss_bytes_median"])
        summary[str(n)] = s
    return summary


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    keeps = result["keeps"]
    ns = sorted(int(n) for n in s)
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    frac = lambda n, key: s[str(n)][key] / s[str(n)]["prompts"]  # noqa: E731
    ax[0].plot(ns, [frac(n, "full_correct") for n in ns], "o-", label="full attention")
    names = [m for m in modes(keeps, result.get("q4_keeps", [])) if m != "full"]
    for k, style in zip(names, ["s--", "^:", "v-."], strict=False):
        ax[0].plot(ns, [frac(n, f"{k}_correct") for n in ns], style,
                   label=f"GemFilter {k.replace('_q4', ' + q4 cache')}")
    ax[0].set_xscale("log", base=2)
    ax[0].set_xticks(ns, [f"{n // 1024}k" for n in ns])
    ax[0].set_ylim(-0.05, 1.05)
    ax[0].set_xlabel("prompt tokens")
    ax[0].set_ylabel("pass keys retrieved")
    counts = sorted({s[str(n)]["prompts"] for n in ns})
    ax[0].set_title(f"Needle in a haystack ({'-'.join(map(str, counts))} prompts per length)")
    ax[0].legend()
    x = np.arange(len(ns))
    names = ["full", *names]
    w = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [s[str(n)].get(f"{name}_ttft_s_median", np.nan) for n in ns]
        ax[1].bar(x + (i - 1) * w, vals, w, label="full" if name == "full" else
                  f"GemFilter {name}")
        mem = [s[str(n)].get(f"{name}_peak_device_bytes_median", np.nan) / 1e6 for n in ns]
        ax[2].bar(x + (i - 1) * w, mem, w, label="full" if name == "full" else
                  f"GemFilter {name}")
    for a, label in ((ax[1], "time to first token (s, median)"),
                     (ax[2], "peak MLX device memory (MB, median)")):
        a.set_xticks(x, [f"{n // 1024}k" for n in ns])
        a.set_ylabel(label)
        a.legend(fontsize=8)
    ax[1].set_title("TTFT (GemFilter: pass 1 + pass 2)")
    ax[2].set_title("peak device memory per call")
    fig.suptitle(f"GemFilter, {result['model']}, MLX on {result.get('gpu') or result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default=MODEL, help="the model's short name (registry)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True, help="path of the GGUF")
    r.add_argument("--prompts", required=True)
    r.add_argument("--out", required=True, help="raw JSON, updated after every prompt; resumes")
    r.add_argument("--keeps", type=int, nargs="+", default=[1024, 2048])
    r.add_argument("--q4-keeps", type=int, nargs="*", default=[],
                   help="keeps also run with a q4 KV cache (a second model on the device)")
    r.add_argument("--limit-s", type=float, default=1e9, help="stop starting prompts after this")
    r.add_argument("--check-tokens", type=int, default=2048,
                   help="MLX vs ONNX Runtime logits after this many tokens (0: skip)")
    f = sub.add_parser("finish")
    f.add_argument("raw")
    f.add_argument("--out", type=Path, default=None,
                   help="default: results/gemfilter_<model>_mlx_gpu.json")
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.out, a.lengths, a.depths, a.trials, a.seed, a.name)
    elif a.cmd == "run":
        run(a.model, a.prompts, a.out, a.keeps, a.limit_s, a.check_tokens, a.q4_keeps)
    else:
        finish(a.raw, a.out)


if __name__ == "__main__":
    main()
