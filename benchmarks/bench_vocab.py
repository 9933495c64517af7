"""The flash-resident vocabulary: how well a low-bit preview head picks the candidates whose
exact logits the two-stage head computes, and generation under a memory budget.

    python benchmarks/bench_vocab.py fidelity [--model smollm2-135m] [--positions 2048]
    python benchmarks/bench_vocab.py budget [--model smollm2-135m] [--budget 0.5]

fidelity: teacher-forced hidden states of the dense model over `positions` tokens of
pydoc_data.topics (from its start; 1024-token windows), the full head's exact float logits
(dequantized GGUF rows), and for each preview encoding and candidate count N: how often the
full head's top-1 is among the N candidates, how often the two-stage greedy token equals the
full head's, the recall of the full head's top 40, and the total-variation distance between the
temperature-1 distributions (two-stage: exact candidates, capped preview tail; vocab/head.py).
Writes benchmarks/results/vocab_fidelity_<model>.json.

speed: fresh children alternate (3 rounds) between the resident Q8_0 head and the two-stage head
on the same flash model (whole FFN resident, nothing skipped, so only the head differs): decode
tokens/s, the head's share of decode time, vocabulary bytes and reads per token, row-pool hit
rate, and whether the greedy texts match. Writes benchmarks/results/vocab_speed_<model>.json.
(Memory under a budget: benchmarks/bench_budget.py.)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
CANDIDATES = [16, 32, 64, 128, 256]


def text():
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def hidden(m, positions: int, window: int = 1024) -> np.ndarray:
    ids = m.tokenize(text()[: positions * 8], add_bos=False)
    bos = m.tokenize("", add_bos=True)
    out, n = [], 0
    while n < positions:
        take = min(window - len(bos), positions - n)
        out.append(m.hidden_states(bos + ids[n : n + take]))
        n += take
    return np.concatenate(out)[: positions + len(out) * len(bos)]


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def fidelity(model: str, positions: int, encodings, block_rows: int = 256) -> dict:
    import flashinfer_lite as fl
    from flashinfer_lite.vocab.head import combine
    from flashinfer_lite.vocab.preview import quantize_rows

    m = fl.load(model)
    t0 = time.perf_counter()
    h = hidden(m, positions)
    f, name, V = m.net.file, "token_embd.weight", m.config.vocab_size
    d = m.config.d_model
    table = np.empty((V, d), np.float32)  # the exact head, dequantized once
    for s in range(0, V, 8192):
        table[s : s + 8192] = f.rows(name, np.arange(s, min(V, s + 8192)))
    results = {"model": model, "positions": len(h), "vocab": V, "hidden_s":
               time.perf_counter() - t0, "encodings": []}
    n_max = max(CANDIDATES)
    for bits, block in encodings:
        grid = quantize_rows(lambda s, e: table[s:e], V, d, bits, block)
        parts = [grid.rows(a, min(V, a + 65536)) for a in range(0, V, 65536)]
        segs = [m.backend.compile(None, lambda g, x, p=p: [g.linear_packed(x, p)], [d])
                for p in parts]
        acc = {n: {"in": [], "greedy": [], "recall": [], "tv": []} for n in CANDIDATES}
        t1 = time.perf_counter()
        for s in range(0, len(h), block_rows):
            hb = h[s : s + block_rows]
            full = hb @ table.T  # (B, V) exact logits
            prev = np.concatenate([sg(hb)[0] for sg in segs], axis=1)  # (B, V) preview
            top1 = full.argmax(1)
            top40 = np.argpartition(full, -40, axis=1)[:, -40:]
            best = np.argpartition(prev, -n_max, axis=1)[:, -n_max:]
            order = np.take_along_axis(
                best, np.argsort(-np.take_along_axis(prev, best, 1), axis=1), 1)
            pf = softmax(full)
            for n in CANDIDATES:
                cand = order[:, :n]
                hyb = combine(prev, cand, np.take_along_axis(full, cand, 1))
                a = acc[n]
                a["in"].append((cand == top1[:, None]).any(1))
                a["greedy"].append(hyb.argmax(1) == top1)
                a["recall"].append([len(np.intersect1d(top40[t], cand[t])) / 40
                                    for t in range(len(hb))])
                a["tv"].append(0.5 * np.abs(pf - softmax(hyb)).sum(1))
        enc = {"bits": bits, "block": block, "bytes": grid.nbytes,
               "bits_per_weight": 8 * grid.nbytes / (V * d),
               "seconds": time.perf_counter() - t1, "by_candidates": []}
        for n in CANDIDATES:
            a = {k: np.concatenate([np.ravel(x) for x in v]) for k, v in acc[n].items()}
            enc["by_candidates"].append({
                "n": n, "top1_in_candidates": float(a["in"].mean()),
                "greedy_equal": float(a["greedy"].mean()),
                "top40_recall": float(a["recall"].mean()),
                "tv_mean": float(a["tv"].mean()), "tv_p95": float(np.quantile(a["tv"], 0.95))})
            print(model, bits, block, enc["by_candidates"][-1], flush=True)
        results["encodings"].append(enc)
    return results


def speed_child(model: str, on_flash: bool, tokens: int) -> dict:
    import flashinfer_lite as fl
    from flashinfer_lite.flash.convert import ensure_converted
    from flashinfer_lite.registry import resolve_model

    m = fl.load(ensure_converted(resolve_model(model)), ffn_share=1.0, skip_fraction=0.0,
                vocab_on_flash=on_flash)
    m.vocab_head and m.vocab_head.rows.reader.drop_page_cache()
    prompt = m.tokenize(text()[:3000])[:128]
    out = m.generate(prompt, max_tokens=tokens, temperature=0.0)
    s = m.stats
    keys = ("tokens_per_s", "head_time_share", "vocab_bytes_read_per_token",
            "vocab_reads_per_token", "vocab_rows_cache_hit_rate", "head_candidates")
    return {"vocab_on_flash": on_flash, "text": out, "resident_bytes": m.resident_bytes,
            "vocab_bytes": m.vocab_bytes, **{k: s.get(k) for k in keys}}


def speed(model: str, tokens: int, rounds: int = 3) -> dict:
    runs = []
    for _ in range(rounds):
        for on_flash in (False, True):
            proc = subprocess.run([sys.executable, __file__, "speed-child", "--model", model,
                                   "--tokens", str(tokens)] + (["--on-flash"] if on_flash
                                                              else []),
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print({k: v for k, v in runs[-1].items() if k != "text"}, flush=True)
    med = {f: float(np.median([r["tokens_per_s"] for r in runs if r["vocab_on_flash"] == f]))
           for f in (False, True)}
    return {"model": model, "tokens": tokens, "rounds": rounds, "runs": runs,
            "decode_tokens_per_s": {"resident_head": med[False], "two_stage": med[True]},
            "speed_ratio": med[True] / med[False],
            "greedy_text_equal": len({r["text"] for r in runs}) == 1}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["fidelity", "speed", "speed-child"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--on-flash", action="store_true")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--encodings", nargs="+", default=["4x64", "4x32", "2x32"],
                    help="bits x group of the preview, e.g. 4x64")
    a = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if a.what == "speed-child":
        print(json.dumps(speed_child(a.model, a.on_flash, a.tokens)))
        return
    if a.what == "speed":
        r = speed(a.model, a.tokens)
        r["machine"] = {"platform": platform.platform(), "python": sys.version.split()[0]}
        out = RESULTS / f"vocab_speed_{a.model}.json"
        out.write_text(json.dumps(r, indent=1))
        print("wrote", out, r["decode_tokens_per_s"], r["speed_ratio"])
        return
    encodings = [tuple(int(v) for v in e.split("x")) for e in a.encodings]
    r = fidelity(a.model, a.positions, encodings)
    r["machine"] = {"platform": platform.platform(), "python": sys.version.split()[0]}
    out = RESULTS / f"vocab_fidelity_{a.model}.json"
    out.write_text(json.dumps(r, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
