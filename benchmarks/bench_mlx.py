"""The MLX backend on a GPU: correctness against the CPU path, decode speed against our CPU path,
and the flash-resident FFN with its neuron pool on the GPU against naive per-token loading.

Three steps, because the GPU machine has no llama.cpp (our tokenizer) and no network:

    python benchmarks/bench_mlx.py prepare   # here: token ids -> results/mlx_inputs.json
    python benchmarks/bench_mlx.py run --model PATH --name smollm2-135m   # GPU machine
    python benchmarks/bench_mlx.py plot      # here: results/mlx_*.json -> results/mlx_decode.png

`prepare` adds the models it is given to the inputs file and leaves those already there
(`--force` redoes them). `run` serves the prepared ids through a lookup tokenizer
(benchmarks/gpu_lookup.py; installed only when llama_cpp is missing) and measures, in one
process, writing its results file after every run so that a crash keeps what finished:
- correctness: 512 positions of `pydoc_data.topics`, `m.logits` on MLX's GPU against the numpy
  backend (the exact float32 reference) and against ONNX Runtime (our fast CPU path);
- decode: greedy tokens/s through `m.stream` after a 128-token prompt, drafts off: MLX on the
  GPU pipelined (kernels/mlx_decode.py; the host's time per token split into building steps and
  waiting for the GPU), MLX sampling each token on the host (the pipeline off), and ONNX
  Runtime on the CPU cores, alternating (A B C C B A ...), medians of the rounds;
- flash: the same decode with the FFN on flash (`ffn_share` 0.5 and 0.25, mode "ours") and
  "naive" (the whole FFN read and copied to the GPU each token), with the all-resident GPU
  model alternating with them; per-token flash bytes, I/O, host->device copy and GPU wait.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from gpu_lookup import LookupTokenizer, install_lookup_tokenizer, pack_ids

RESULTS = Path(__file__).resolve().parent / "results"
INPUTS = RESULTS / "mlx_inputs.json"
EVAL_TOKENS = 512
PROMPT_TOKENS = 128
CALIBRATION_TOKENS = 512  # flash/calibration.py's default
SECTIONS = ("correctness", "decode", "flash")


# ---- prepare (on a machine with llama.cpp) ------------------------------------------------
def prepare(models: list[str], force: bool = False) -> None:
    from flashinfer_lite.flash.calibration import calibration_ids, token_order
    from flashinfer_lite.registry import resolve_model
    from flashinfer_lite.tokenizer import Tokenizer

    table = json.loads(INPUTS.read_text()) if INPUTS.exists() else {}
    # the two tails of the topics text that building the flash format tokenizes
    tails = (16 * CALIBRATION_TOKENS, inspect.signature(token_order).parameters["chars"].default)
    for name in models:
        if name in table and not force:
            print(f"{name}: already in {INPUTS.name} (--force redoes it)")
            continue
        tok = Tokenizer(resolve_model(name))
        text = topics_text()
        entry = {
            "eval_ids": tok.encode(text[:8 * EVAL_TOKENS], add_bos=True)[:EVAL_TOKENS],
            "topics_tail": {str(n): pack_ids(tok.encode(text[-n:], add_bos=False))
                            for n in tails},
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "n_vocab": tok.n_vocab,
            "eog": [],  # decode runs its full length: no token ends it
            "python": sys.version.split()[0],
        }
        assert (calibration_ids(LookupTokenizer(entry), CALIBRATION_TOKENS)
                == calibration_ids(tok, CALIBRATION_TOKENS))
        table[name] = entry
        print(f"{name}: {len(entry['eval_ids'])} evaluation ids, calibration tails {tails}")
    RESULTS.mkdir(exist_ok=True)
    INPUTS.write_text(json.dumps(table))
    print(f"wrote {INPUTS}")


def topics_text() -> str:
    from flashinfer_lite.evaluation import topics_text as text

    return text()


# ---- run (on the GPU machine) -------------------------------------------------------------
def _cap_onnx_ir_version(cap: int = 10) -> None:
    """The GPU machine's onnxruntime reads IR versions <= 13, older than its onnx writes."""
    import onnx
    import onnxruntime

    helper = onnx.helper
    make = helper.make_model

    def make_model(*a, **kw):
        m = make(*a, **kw)
        m.ir_version = min(m.ir_version, cap)
        return m

    if make.__name__ != "make_model" or getattr(make, "_capped", False):
        return
    make_model._capped = True
    helper.make_model = make_model
    print("onnxruntime", onnxruntime.__version__, "onnx", onnx.__version__)


class Engine:
    """A loaded model and how a decode run calls it: stream keywords, and whether the MLX
    greedy pipeline may run (off: every token's logits go to the host's sampler)."""

    def __init__(self, m, pipelined: bool = True, **stream_kw):
        self.m, self.pipelined, self.stream_kw = m, pipelined, stream_kw

    def pipeline(self):
        net = self.m.net
        return net.backend.greedy_pipeline(net, self.m.prompt_cache.caches)

    def decode(self, prompt, tokens: int) -> dict:
        m = self.m
        m.reset()
        if not self.pipelined:  # the backend's pipeline hidden for this run only
            m.net.backend.greedy_pipeline = lambda net, caches: None
        pipe = self.pipeline() if self.pipelined else None
        if pipe is not None:
            pipe.reset_counters()
        try:
            for _ in m.stream(prompt, max_tokens=tokens, **self.stream_kw):
                pass
        finally:
            vars(m.net.backend).pop("greedy_pipeline", None)
        s = dict(m.stats)
        first = getattr(m, "_flash_at_first", None) or {}
        n = s["generated_tokens"]
        if first and n > 1:
            for k in ("h2d_bytes", "h2d_s", "device_wait_s"):
                s[f"{k}_per_token"] = (s[k] - first[k]) / (n - 1)
        if pipe is not None and pipe.steps:
            s.update(pipelined=True, host_build_s_per_token=pipe.host_s / pipe.steps,
                     host_wait_s_per_token=pipe.wait_s / pipe.steps)
        keep = ("tokens_per_s", "prefill_tokens_per_s", "generated_tokens", "flash_read_mode",
                "flash_bytes_read_per_token", "flash_reads_per_token", "io_s_per_token",
                "memory_management_s_per_token", "compute_s_per_token", "h2d_bytes_per_token",
                "h2d_s_per_token", "device_wait_s_per_token", "neuron_cache_hit_rate",
                "ffn_active_fraction", "pool_bytes", "pipelined", "host_build_s_per_token",
                "host_wait_s_per_token", "tokens_per_pass")
        return {k: s[k] for k in keep if k in s}


def _rounds(engines: dict, prompt, tokens: int, rounds: int, save) -> dict:
    """Every engine once per round, the order reversed every other round; medians. save(out)
    is called after every run with what has finished so far."""
    names = list(engines)
    for name in names:  # warm-up: kernels compiled, pools filled
        engines[name].decode(prompt, 4)
    runs = {n: [] for n in names}

    def summary() -> dict:
        out = {}
        for name, rs in runs.items():
            if not rs:
                continue
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]
                   if isinstance(rs[0][k], (int, float)) and not isinstance(rs[0][k], bool)}
            med.update({k: rs[0][k] for k in rs[0] if isinstance(rs[0][k], (str, bool))})
            med["tokens_per_s_runs"] = [r["tokens_per_s"] for r in rs]
            out[name] = med
        return out

    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(engines[name].decode(prompt, tokens))
            print(f"  round {r} {name}: {runs[name][-1]['tokens_per_s']:.1f} tok/s", flush=True)
            save(summary())
    return summary()


def run(path: str, name: str, out_dir: str, rounds: int, tokens: int, flash_tokens: int,
        eval_tokens: int = EVAL_TOKENS, lookup: bool = False, sections=SECTIONS,
        references=("numpy", "onnxruntime")) -> None:
    import importlib.util

    import flashinfer_lite as fl
    from flashinfer_lite.evaluation import compare_logits

    table = json.loads(INPUTS.read_text())[name]
    _cap_onnx_ir_version()
    if lookup or importlib.util.find_spec("llama_cpp") is None:
        install_lookup_tokenizer(table)
    import mlx.core as mx

    out = Path(out_dir) / f"mlx_{name}.json"
    result = {"model": name, "device": str(mx.default_device()), "host": platform.node(),
              "python": sys.version.split()[0], "mlx": mx.__version__,
              "command": " ".join(sys.argv), "sections": list(sections)}

    def save(key=None, value=None) -> None:
        if key is not None:
            result[key] = value
        out.write_text(json.dumps(result, indent=1))

    try:
        import subprocess

        result["gpu"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        result["gpu"] = None
    ids = table["eval_ids"][:eval_tokens]
    t0 = time.perf_counter()
    gpu = fl.load(path, backend="mlx")
    result["load_s_mlx"] = time.perf_counter() - t0
    result["resident_bytes_mlx"] = gpu.resident_bytes
    t0 = time.perf_counter()
    ort = fl.load(path, backend="onnxruntime")
    result["load_s_onnxruntime"] = time.perf_counter() - t0
    result["threads_onnxruntime"] = ort.threads
    save()

    if "correctness" in sections:
        t0 = time.perf_counter()
        lg = gpu.logits(ids)
        result["logits_s_mlx"] = time.perf_counter() - t0
        refs = {}
        if "numpy" in references:
            ref = fl.load(path, backend="numpy")
            t0 = time.perf_counter()
            refs["numpy"] = ref.logits(ids)
            result["logits_s_numpy"] = time.perf_counter() - t0
            ref.close()
        if "onnxruntime" in references:
            refs["onnxruntime"] = ort.logits(ids)
        agree = {f"vs_{k}": compare_logits(lg, v, ids).as_dict() for k, v in refs.items()}
        if len(refs) == 2:
            agree["onnxruntime_vs_numpy"] = compare_logits(
                refs["onnxruntime"], refs["numpy"], ids).as_dict()
        save("correctness", agree)
        print(json.dumps(agree, indent=1), flush=True)
        del lg, refs

    prompt = ids[:PROMPT_TOKENS]
    if "decode" in sections:  # all-resident: GPU pipelined, GPU host-sampled, our CPU path
        print("decode", flush=True)
        engines = {"mlx_gpu": Engine(gpu, num_draft_tokens=0),
                   "mlx_gpu_host_sampled": Engine(gpu, pipelined=False, num_draft_tokens=0),
                   "onnxruntime_cpu": Engine(ort, num_draft_tokens=0)}
        mx.reset_peak_memory()
        save("decode", _rounds(engines, prompt, tokens, rounds, lambda d: save("decode", d)))
        save("peak_gpu_bytes_decode", int(mx.get_peak_memory()))
    ort.close()

    if "flash" in sections:  # the flash-resident FFN on the GPU
        print("flash", flush=True)
        t0 = time.perf_counter()
        flash = {"resident": gpu}
        for label, kw in (("ours_0.50", dict(ffn_share=0.5)), ("ours_0.25", dict(ffn_share=0.25)),
                          ("naive", dict(ffn_share=0.5, ffn_mode="naive")),
                          ("ours_0.50_no_overlap", dict(ffn_share=0.5))):
            flash[label] = fl.load(path, backend="mlx", **kw)
        flash["ours_0.50_no_overlap"].flash.overlap = False  # the A/B for mx.async_eval
        result["flash_setup_s"] = time.perf_counter() - t0
        engines = {k: Engine(m) for k, m in flash.items()}
        f = _rounds(engines, prompt[:64], flash_tokens, rounds, lambda d: save("flash", d))
        for label in ("ours_0.50", "ours_0.25"):
            f[label]["speedup_vs_naive"] = f[label]["tokens_per_s"] / f["naive"]["tokens_per_s"]
            f[label]["bytes_ratio_naive_over_ours"] = (
                f["naive"]["flash_bytes_read_per_token"] / f[label]["flash_bytes_read_per_token"])
            f[label]["vs_resident"] = f[label]["tokens_per_s"] / f["resident"]["tokens_per_s"]
        save("flash", f)
    print(json.dumps({k: result[k] for k in ("decode", "flash") if k in result}, indent=1))
    print(f"wrote {out}")


# ---- plot (here) ----------------------------------------------------------------------------
def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = sorted(RESULTS.glob("mlx_*.json"))
    data = [json.loads(p.read_text()) for p in files if p.name != INPUTS.name]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    labels = {"mlx_gpu": "MLX (GPU)\npipelined", "mlx_gpu_host_sampled": "MLX (GPU)\nhost-sampled",
              "onnxruntime_cpu": "ONNX Runtime\n(CPU)"}
    w = 0.8 / max(1, len(data))
    for i, d in enumerate(data):
        xs = [j for j, k in enumerate(labels) if k in d.get("decode", {})]
        axes[0].bar([j + i * w for j in xs],
                    [d["decode"][k]["tokens_per_s"] for k in labels if k in d["decode"]], w,
                    label=f"{d['model']} ({(d.get('gpu') or '').split(',')[0]})")
    axes[0].set_xticks([j + w * (len(data) - 1) / 2 for j in range(len(labels))],
                       list(labels.values()))
    axes[0].set_ylabel("decode tokens/s (median)")
    axes[0].set_title("all-resident, greedy, drafts off (older files: drafts on)")
    axes[0].legend(fontsize=7)
    flash = [d for d in data if "flash" in d]
    fl_labels = ["resident", "ours_0.50", "ours_0.25", "naive"]
    for i, d in enumerate(flash):
        axes[1].bar([j + i * w for j in range(len(fl_labels))],
                    [d["flash"][k]["tokens_per_s"] for k in fl_labels], w, label=d["model"])
    axes[1].set_xticks([j + w / 2 for j in range(len(fl_labels))],
                       ["resident", "flash 50%", "flash 25%", "naive"])
    axes[1].set_ylabel("decode tokens/s (median)")
    axes[1].set_title("FFN on flash, pool on the GPU")
    axes[1].legend()
    # where a flash decode step's time goes (medians, ms per token)
    parts = [("io_s_per_token", "flash reads"), ("h2d_s_per_token", "host->device copy (host)"),
             ("memory_management_s_per_token", "pool bookkeeping"),
             ("ffn_host_s_per_token", "FFN setup (host)"),
             ("device_wait_s_per_token", "waiting for the GPU")]
    bars, names = [], []
    for d in flash:
        for k in ("ours_0.50", "ours_0.25", "naive"):
            r = dict(d["flash"][k])
            r["ffn_host_s_per_token"] = r["compute_s_per_token"] - r["h2d_s_per_token"]
            total = 1.0 / r["tokens_per_s"]
            vals = [r[p] for p, _ in parts]
            bars.append([*vals, total - sum(vals)])
            names.append(f"{d['model'].split('-')[0]}\n{k.replace('ours_', 'ours ')}")
    bottom = np.zeros(len(bars))
    for i, label in enumerate([n for _, n in parts] + ["other host work"]):
        v = np.array([b[i] for b in bars]) * 1e3
        axes[2].bar(range(len(bars)), v, bottom=bottom, label=label)
        bottom += v
    axes[2].set_xticks(range(len(bars)), names, fontsize=8)
    axes[2].set_ylabel("ms per generated token")
    axes[2].set_title("flash decode: where the time goes")
    axes[2].legend(fontsize=7)
    fig.suptitle("flashinfer-lite MLX backend on NVIDIA GPUs")
    fig.tight_layout()
    fig.savefig(RESULTS / "mlx_decode.png", dpi=120)
    print(f"wrote {RESULTS / 'mlx_decode.png'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--force", action="store_true",
                   help="redo models already in the inputs file (default: keep them)")
    r = sub.add_parser("run")
    r.add_argument("--model", required=True, help="path of the GGUF")
    r.add_argument("--name", required=True, help="the model's name in the inputs file")
    r.add_argument("--out", default=str(RESULTS))
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--tokens", type=int, default=128, help="greedy tokens per decode run")
    r.add_argument("--flash-tokens", type=int, default=32,
                   help="greedy tokens per run in the flash section")
    r.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    r.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    r.add_argument("--references", nargs="+", choices=("numpy", "onnxruntime"),
                   default=["numpy", "onnxruntime"],
                   help="what the GPU's logits are checked against")
    r.add_argument("--lookup-tokenizer", action="store_true",
                   help="use the prepared ids even where llama.cpp is installed (a dry run)")
    sub.add_parser("plot")
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.models, a.force)
    elif a.cmd == "run":
        run(a.model, a.name, a.out, a.rounds, a.tokens, a.flash_tokens, a.eval_tokens,
            a.lookup_tokenizer, a.sections, a.references)
    else:
        plot()


if __name__ == "__main__":
    main()
