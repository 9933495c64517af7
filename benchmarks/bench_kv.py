"""The compact KV cache: memory, decode speed, perplexity, pass-key retrieval and chat prefix
reuse, f16 vs q8 vs q4, compared within one run.

    python benchmarks/bench_kv.py memory   [--model smollm2-135m] [--tokens 4096]
    python benchmarks/bench_kv.py speed    [--model smollm2-135m] [--tokens 4096] [--rounds 5]
    python benchmarks/bench_kv.py ppl      [--model gemma3-270m]  [--tokens 8192] [--kinds f16]
    python benchmarks/bench_kv.py passkey  [--lengths 4096 8192] [--trials 10] [--kinds q4]
    python benchmarks/bench_kv.py chat     [--model smollm2-135m] [--repeat 5] [--no-llama]
                                           [--llama-threads 1]

Each writes benchmarks/results/kv_<what>_<model>.json (ppl and passkey: one file per set of
kinds, so kinds may run in separate processes; a kind "q4/64" is q4 with 64-token key groups).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from flashinfer_lite.evaluation import topics_text

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("f16", "q8", "q4")


def write(name: str, args, result: dict, quiet: bool = False) -> None:
    RESULTS.mkdir(exist_ok=True)
    result = {"machine": platform.machine(), "python": platform.python_version(),
              "args": vars(args), **result}
    path = RESULTS / f"kv_{name}_{args.model}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)  # a run cut mid-write leaves the previous file whole
    if not quiet:
        print(json.dumps(result, indent=1))
        print(f"wrote {path}")


# ---- memory: one child per kind, so RSS belongs to one cache -------------------------------------
def memory_child(model: str, kind: str, tokens: int, threads: int) -> dict:
    import flashinfer_lite as fl
    from flashinfer_lite.memory import release_freed_memory, rss_bytes

    m = fl.load(model, kv_cache=kind, threads=threads)
    ids = m.tokenize(topics_text())[:tokens]
    m.generate(ids[:8], max_tokens=1)  # warm every session, allocate the small caches
    m.reset()
    release_freed_memory()
    before = rss_bytes()
    m.generate(ids, max_tokens=1)  # prefill `tokens` positions (+1 generated, not fed)
    release_freed_memory()
    after = rss_bytes()
    held = m.kv_bytes
    return {"kind": kind, "positions": m.prompt_cache.caches[0].offset, "kv_bytes": held,
            "bytes_per_token_nbytes": held / tokens,
            "rss_delta_bytes": after - before, "bytes_per_token_rss": (after - before) / tokens}


def cmd_memory(args):
    rows = []
    for kind in KINDS:
        out = subprocess.run([sys.executable, __file__, "_memory_child", kind, "--model",
                              args.model, "--tokens", str(args.tokens)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    f16 = rows[0]
    for r in rows:
        r["ratio_nbytes_vs_f16"] = r["kv_bytes"] / f16["kv_bytes"]
        r["ratio_rss_vs_f16"] = r["rss_delta_bytes"] / f16["rss_delta_bytes"]
    write("memory", args, {"rows": rows})


# ---- speed: one prefill in f16, copied into q8/q4 caches; decode alternating kinds ---------------
def caches_from(m, spec, source):
    """New caches of `spec` holding what `source` caches hold (decode speed depends only on
    the sizes; this saves two 4k-token prefills)."""
    from flashinfer_lite.prompt_cache import make_layer_caches

    caches = make_layer_caches(m.net, spec)
    for src, dst in zip(source, caches, strict=True):
        k, v, _ = src.fetch()
        for a in range(0, len(k), 256):
            dst.update(k[a : a + 256], v[a : a + 256])
    return caches


def cmd_speed(args):
    import flashinfer_lite as fl
    from flashinfer_lite.cache.kv import KVSpec
    from flashinfer_lite.prompt_cache import PromptCache

    m = fl.load(args.model, threads=args.threads)
    ids = m.tokenize(topics_text())[: args.tokens]
    t0 = time.perf_counter()
    m.generate(ids, max_tokens=1)
    prefill_s = time.perf_counter() - t0
    f16 = m.prompt_cache.caches
    sets = {"f16": f16}
    for kind in KINDS[1:]:
        sets[kind] = caches_from(m, KVSpec(kind), f16)
    cached = list(m.prompt_cache.ids)
    times = {k: [] for k in KINDS}
    rng = np.random.default_rng(0)
    for _ in range(args.rounds):
        for kind in KINDS:
            m.swap_cache(PromptCache(list(cached), sets[kind], id(m)))
            n0 = m.prompt_cache.caches[0].offset
            toks = rng.integers(100, 1000, args.decode).tolist()
            t0 = time.perf_counter()
            for t in toks:
                m.runner(m.prompt_cache, [t])
            times[kind].append((time.perf_counter() - t0) / len(toks))
            for c in m.prompt_cache.caches:
                c.trim(c.offset - n0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = {k: {"tokens_per_s": 1 / med[k], "ms_per_token": med[k] * 1e3,
                "slowdown_vs_f16": med[k] / med["f16"], "kv_bytes": sum(c.nbytes for c in sets[k]),
                "all_rounds_ms": [t * 1e3 for t in times[k]]} for k in KINDS}
    write("speed", args, {"context": args.tokens, "prefill_s_f16": prefill_s, "rows": rows})


# ---- perplexity: the text scored chunk by chunk through the prompt path --------------------------
def chunked_nll(m, ids, chunk: int, on_chunk=None) -> np.ndarray:
    """Negative log-likelihood of ids[1:], feeding ids through the model's prompt path in chunks
    (so only one chunk's logits exist at a time: Gemma's are 1 MB per position).
    on_chunk(nll so far) after each chunk, so a long run cut short keeps what it scored."""
    from flashinfer_lite.evaluation import log_softmax

    m.reset()
    nll = []
    for a in range(0, len(ids) - 1, chunk):
        part = ids[a : a + chunk]
        h = m.net.forward(np.asarray(part, np.int64), m.prompt_cache.caches)
        m.prompt_cache.ids.extend(part)
        lp = log_softmax(m.net.head(h))
        nxt = ids[a + 1 : a + 1 + len(part)]
        nll.append(-lp[np.arange(len(nxt)), nxt])
        if on_chunk is not None:
            on_chunk(np.concatenate(nll))
    return np.concatenate(nll)


def kind_spec(kind: str):
    """"f16" | "q8" | "q4", or "q4/64": q4 with key groups of 64 tokens (a layout to compare)."""
    from flashinfer_lite.cache.kv import KVSpec

    name, _, group = kind.partition("/")
    return KVSpec(name, key_group=int(group)) if group else KVSpec(name)


def cmd_ppl(args):
    import flashinfer_lite as fl

    m = fl.load(args.model, threads=args.threads)
    ids = m.tokenize(topics_text())[: args.tokens]
    rows = {}
    # kinds may run in separate processes (--kinds f16, --kinds q8, ...): one file each
    name = "ppl_" + "_".join(k.replace("/", "g") for k in args.kinds)
    for kind in args.kinds:
        m.kv_spec = kind_spec(kind)
        t0 = time.perf_counter()
        curve = []  # (tokens scored, perplexity so far): kinds compare at equal lengths

        def progress(nll, kind=kind, t0=t0, curve=curve):
            curve.append([len(nll), float(np.exp(nll.mean()))])
            rows[kind] = {"ppl": curve[-1][1],
                          "ppl_last_half": float(np.exp(nll[len(nll) // 2 :].mean())),
                          "seconds": time.perf_counter() - t0, "kv_bytes": m.kv_bytes,
                          "nll_sum": float(nll.sum()), "scored": len(nll),
                          "complete": len(nll) == len(ids) - 1, "ppl_by_tokens": curve}
            print(kind, curve[-1], flush=True)
            write(name, args, {"scored_tokens": len(ids) - 1, "rows": rows}, quiet=True)

        chunked_nll(m, ids, 256, progress)
        print(kind, rows[kind], flush=True)
    write(name, args, {"scored_tokens": len(ids) - 1, "rows": rows})


# ---- pass-key retrieval (Gemma 3 270M) ----------------------------------------------------------
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def passkey_prompt(m, n_tokens: int, key: int, depth: float) -> list[int]:
    """Filler text with 'The pass key is KEY. Remember it.' at `depth`, then the question."""
    head = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize "
            "it. I will quiz you about the pass key.\n")
    needle = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    tail = "\nWhat is the pass key? The pass key is"
    per = len(m.tokenize(FILLER, add_bos=False))
    fixed = len(m.tokenize(head + needle + tail))
    reps = max(1, (n_tokens - fixed) // per)
    before = int(reps * depth)
    text = head + FILLER * before + needle + FILLER * (reps - before) + tail
    return m.tokenize(text)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=RESULTS.parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def cmd_passkey(args):
    """Trials resume: a row already in the result file keeps its finished trials (when they
    are the same keys and depths) and only the missing ones run."""
    import flashinfer_lite as fl

    m = fl.load(args.model, threads=args.threads)
    name = "passkey_" + "_".join(map(str, args.lengths)) + "_" + "_".join(
        k.replace("/", "g") for k in args.kinds)
    path = RESULTS / f"kv_{name}_{args.model}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() and args.resume else {}
    commit = git_commit()
    for n in args.lengths:
        # one generator per length, so a length's trials do not depend on the other lengths
        # asked for; deepest needle first
        rng = random.Random(args.seed)
        trials = sorted(((rng.randint(10000, 99999), rng.uniform(0.1, 0.9))
                         for _ in range(args.trials)), key=lambda t: -t[1])
        for kind in args.kinds:
            m.kv_spec = kind_spec(kind)
            m.reset()
            row = rows.get(f"{n}/{kind}")
            done = 0 if row is None else row["trials"]
            if row is None or row["keys"] != [k for k, _ in trials[:done]]:
                done = 0
                row = {"kind": kind, "correct": 0, "trials": 0, "answers": [], "keys": [],
                       "depths": [], "tokens": []}
            rows[f"{n}/{kind}"] = row
            row.setdefault("commits", [None] * done)
            row.setdefault("trial_seconds", [None] * done)
            t0 = time.perf_counter() - row.get("seconds", 0.0)
            for key, depth in trials[done:]:
                t1 = time.perf_counter()
                ids = passkey_prompt(m, n, key, depth)
                out = m.generate(ids, max_tokens=7)
                row["correct"] += str(key) in out.replace(" ", "")
                row["trials"] += 1
                row["answers"].append(out)
                row["keys"].append(key)
                row["depths"].append(round(depth, 3))
                row["tokens"].append(len(ids))
                row["commits"].append(commit)
                row["trial_seconds"].append(time.perf_counter() - t1)
                row["seconds"] = time.perf_counter() - t0
                # after each trial: a long run may be cut; one file per lengths and kinds
                write(name, args, {"rows": rows})
            print(n, kind, row["correct"], "/", row["trials"], flush=True)


# ---- chat: time to first token of turn 5, short vs long history ---------------------------------
QUESTIONS = ["What is a list in Python?", "And a tuple?", "How do I sort a list?",
             "What does len do?", "How do I reverse a string?"]


def chat_until_turn5(model: str, kind: str, threads: int, system: str):
    """A model that has answered turns 1-4 (prefix reuse on every turn) and the history
    with turn 5's question; returns (model, history, per-turn stats)."""
    import flashinfer_lite as fl

    m = fl.load(model, threads=threads, kv_cache=kind)
    history = [{"role": "system", "content": system}]
    turns = []
    for q in QUESTIONS[:-1]:
        history.append({"role": "user", "content": q})
        reply = "".join(c.text for c in m.stream_chat(history, max_tokens=24))
        turns.append({k: m.stats[k] for k in ("ttft_s", "prefill_tokens", "prompt_tokens")})
        history.append({"role": "assistant", "content": reply})
    history.append({"role": "user", "content": QUESTIONS[-1]})
    return m, history, turns


def turn5_ttft(m, history, keep: int | None) -> tuple[float, int, int, float]:
    """Ask turn 5 once (after trimming the cache back to `keep` positions, when given: the
    cache as it was before turn 5's new tokens); (ttft_s, prefill tokens, history tokens,
    call_ttft_s). ttft_s is m.stats' (from the token ids); call_ttft_s counts from the call
    with the messages, so rendering the template and tokenizing the history are in it."""
    if keep is not None:
        for c in m.prompt_cache.caches:
            c.trim(c.offset - keep)
        del m.prompt_cache.ids[keep:]
    t0 = time.perf_counter()
    call_ttft = None
    for _ in m.stream_chat(history, max_tokens=1):
        call_ttft = call_ttft or time.perf_counter() - t0
    return (m.stats["ttft_s"], m.stats["prefill_tokens"], m.stats["prompt_tokens_reused"],
            call_ttft)


def llama_turn5(prompts: dict, keep: dict, path, threads: int, repeat: int) -> dict:
    """The same turn-5 prompts in llama.cpp (float16 KV cache): time to evaluate the new
    tokens after the history, alternated like ours - what the attention over a longer
    history costs in a mature runtime, for reference."""
    from flashinfer_lite.reference import llama_cpp_model

    llms = {}
    for label, ids in prompts.items():
        llm = llama_cpp_model(path, n_ctx=4096, n_batch=512, n_threads=threads,
                              n_threads_batch=threads)  # batch threads default to all
        llm.eval(ids[: keep[label]])
        llms[label] = llm
    times = {label: [] for label in prompts}
    for _ in range(repeat):
        for label, ids in prompts.items():
            llm = llms[label]
            llm.n_tokens = keep[label]  # drop turn 5's tokens: eval() trims the cache there
            t0 = time.perf_counter()
            llm.eval(ids[keep[label] :])
            times[label].append(time.perf_counter() - t0)
    rows = {f"{label}/llama.cpp": {"history_tokens_turn5": keep[label],
                                   "turn5_prefill_tokens": len(prompts[label]) - keep[label],
                                   "ttft_turn5_all_s": times[label],
                                   "ttft_turn5_min_s": min(times[label]),
                                   "ttft_turn5_median_s": statistics.median(times[label])}
            for label in prompts}
    for stat in ("min", "median"):
        rows[f"ratio_{stat}/llama.cpp"] = (rows["long/llama.cpp"][f"ttft_turn5_{stat}_s"]
                                           / rows["short/llama.cpp"][f"ttft_turn5_{stat}_s"])
    return rows


def cmd_chat(args):
    """Turn 5's time to first token with a short and a long system prompt, both chats held
    in one process and their turn-5 attempts alternated (short, long, short, ...) so that
    the shared machine's load hits both alike; medians and minimums of `repeat` each."""
    doc = topics_text()
    rows = {}
    for kind in args.kinds:
        chats = {label: chat_until_turn5(args.model, kind, args.threads,
                                         "Reference:\n" + doc[:chars])
                 for label, chars in (("short", 200), ("long", 8000))}
        keep = {label: None for label in chats}
        times = {label: [] for label in chats}
        call_times = {label: [] for label in chats}
        prefilled = {}
        for _ in range(args.repeat):
            for label, (m, history, _) in chats.items():
                t, prefilled[label], keep[label], call_t = turn5_ttft(m, history, keep[label])
                times[label].append(t)
                call_times[label].append(call_t)
        if args.llama and "ratio_min/llama.cpp" not in rows:  # once, with the first kind
            rows.update(llama_turn5({label: list(m.prompt_cache.ids) for label, (m, _, _) in
                                     chats.items()}, keep, chats["short"][0].path,
                                    args.llama_threads, args.repeat))
        for label, (m, _, turns) in chats.items():
            rows[f"{label}/{kind}"] = {
                "history_tokens_turn5": keep[label], "turn5_prefill_tokens": prefilled[label],
                "turns_1_4": turns, "ttft_turn5_all_s": times[label],
                "ttft_turn5_min_s": min(times[label]),
                "ttft_turn5_median_s": statistics.median(times[label]),
                "call_ttft_turn5_all_s": call_times[label],
                "call_ttft_turn5_min_s": min(call_times[label]),
                "call_ttft_turn5_median_s": statistics.median(call_times[label])}
            m.close()
        for stat in ("min", "median"):
            for what in ("ttft", "call_ttft"):
                rows[f"{what}_ratio_{stat}/{kind}".removeprefix("ttft_")] = (
                    rows[f"long/{kind}"][f"{what}_turn5_{stat}_s"]
                    / rows[f"short/{kind}"][f"{what}_turn5_{stat}_s"])
        print(kind, {k: v for k, v in rows.items() if k.endswith(kind) and "ratio" in k},
              flush=True)
    write("chat", args, {"rows": rows})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["memory", "speed", "ppl", "passkey", "chat",
                                    "_memory_child"])
    p.add_argument("kind", nargs="?")
    p.add_argument("--model", default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="passkey: start over instead of keeping the finished trials")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--kinds", nargs="+", default=list(KINDS))
    p.add_argument("--no-llama", dest="llama", action="store_false",
                   help="chat: skip the llama.cpp reference")
    p.add_argument("--llama-threads", type=int, default=1,
                   help="chat: llama.cpp's threads (2 spinning threads starve on shared cores)")
    args = p.parse_args()
    defaults = {"ppl": ("gemma3-270m", 8192), "passkey": ("gemma3-270m", None)}
    model, tokens = defaults.get(args.what, ("smollm2-135m", 4096))
    args.model = args.model or model
    args.tokens = args.tokens or tokens
    if args.what == "_memory_child":
        print(json.dumps(memory_child(args.model, args.kind, args.tokens, args.threads)))
        return
    globals()[f"cmd_{args.what}"](args)


if __name__ == "__main__":
    main()
