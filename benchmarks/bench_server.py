"""The server under load: C concurrent streaming clients (the official openai package), each
holding its own R-turn chat (every request sends the whole conversation, as chat apps do),
greedy, small max_tokens, against `flashinfer-lite serve` in a child process on loopback.

1. single client: the C conversations one after another -> the reference answers, requests/s
   and time to first token (TTFT) without contention;
2. C clients at once -> requests/s, TTFT p50/p95 (queueing included: requests are served one
   at a time), every answer compared with the single-client one, errors counted;
3. the server's RSS when idle, before the load (after the single-client pass, which runs the
   same requests) and after it.

    python benchmarks/bench_server.py [--clients 8] [--requests 20] [--max-tokens 12]

Writes benchmarks/results/server_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pydoc_data.topics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def conversations(n_clients: int, n_turns: int) -> list[list[str]]:
    """Distinct user turns per client, from the pydoc topic names (real, varied subjects)."""
    topics = sorted(pydoc_data.topics.topics)
    step = max(1, len(topics) // (n_clients * n_turns))
    out = []
    for c in range(n_clients):
        out.append([f"In one sentence, what is '{topics[(c * n_turns + j) * step % len(topics)]}'"
                    f" in Python?" for j in range(n_turns)])
    return out


def start_server(model: str, cache_slots: int, threads: int):
    cmd = [sys.executable, "-m", "flashinfer_lite.cli.main", "serve", "-m", model, "--port",
           "0", "--cache-slots", str(cache_slots), "-t", str(threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines = []
    while True:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit("server exited: " + "".join(lines))
        lines.append(line)
        if line.startswith("serving "):
            return proc, line.split(" at ", 1)[1].strip()


def run_conversation(client, model_id: str, turns: list[str], max_tokens: int, out: list):
    """One client's chat: each request streams; records text, TTFT, latency, completeness."""
    history = []
    for turn in turns:
        history.append({"role": "user", "content": turn})
        t0 = time.perf_counter()
        ttft, parts, finish, error = None, [], None, None
        try:
            stream = client.chat.completions.create(model=model_id, messages=history,
                                                    max_tokens=max_tokens, temperature=0,
                                                    stream=True)
            for chunk in stream:
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta.content
                if delta and ttft is None:
                    ttft = time.perf_counter() - t0
                if delta:
                    parts.append(delta)
                finish = chunk.choices[0].finish_reason or finish
        except Exception as exc:  # counted, not raised: the run reports every failure
            error = f"{type(exc).__name__}: {exc}"
        text = "".join(parts)
        out.append({"text": text, "ttft_s": ttft, "latency_s": time.perf_counter() - t0,
                    "finish_reason": finish, "error": error})
        history.append({"role": "assistant", "content": text})


def summarize(records: list[dict], wall: float) -> dict:
    ttft = sorted(r["ttft_s"] for r in records if r["ttft_s"] is not None)
    lat = sorted(r["latency_s"] for r in records)

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else None

    return {"requests": len(records), "wall_s": wall, "requests_per_s": len(records) / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
            "latency_p50_s": pct(lat, 50), "latency_p95_s": pct(lat, 95),
            "errors": sum(r["error"] is not None for r in records),
            "incomplete": sum(r["finish_reason"] not in ("stop", "length") for r in records)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20, help="turns per client")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2, help="the server's compute threads")
    ap.add_argument("--timeout", type=float, default=900, help="bound on the load phase (s)")
    a = ap.parse_args()
    import openai

    convs = conversations(a.clients, a.requests)
    # one cache slot per client: each conversation's next turn finds its own cache
    proc, base_url = start_server(a.model, a.clients, a.threads)
    server = psutil.Process(proc.pid)
    try:
        def client():
            return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0,
                                 timeout=a.timeout)

        rss_idle = server.memory_info().rss
        single = []
        t0 = time.perf_counter()
        for turns in convs:
            recs = []
            run_conversation(client(), a.model, turns, a.max_tokens, recs)
            single.append(recs)
        single_wall = time.perf_counter() - t0
        rss_before = server.memory_info().rss

        loaded = [[] for _ in convs]
        threads = [threading.Thread(target=run_conversation,
                                    args=(client(), a.model, turns, a.max_tokens, loaded[i]))
                   for i, turns in enumerate(convs)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(1.0, a.timeout - (time.perf_counter() - t0)))
        load_wall = time.perf_counter() - t0
        timed_out = any(t.is_alive() for t in threads)
        rss_after = server.memory_info().rss
        with client()._client as http:  # the server's own account of its caches
            health = http.get(base_url.removesuffix("/v1") + "/health").json()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        proc.stderr.close()

    flat_single = [r for recs in single for r in recs]
    flat_load = [r for recs in loaded for r in recs]
    mismatches = [{"client": c, "turn": j, "single": s["text"], "concurrent": r["text"]}
                  for c in range(len(convs)) for j, (s, r) in
                  enumerate(zip(single[c], loaded[c], strict=False)) if s["text"] != r["text"]]
    sum_single, sum_load = summarize(flat_single, single_wall), summarize(flat_load, load_wall)
    result = {
        "model": a.model, "clients": a.clients, "requests_per_client": a.requests,
        "max_tokens": a.max_tokens, "server_threads": a.threads, "cache_slots": a.clients,
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, shared with other "
                   "jobs: absolute times are noisy, compare within this file",
        "single_client": sum_single, "concurrent": sum_load,
        "requests_per_s_ratio_concurrent_vs_single":
            sum_load["requests_per_s"] / sum_single["requests_per_s"],
        "timed_out": timed_out,
        "completed": len(flat_load), "expected": a.clients * a.requests,
        "all_equal_to_single_client": not mismatches and len(flat_load) == len(flat_single),
        "mismatches": mismatches[:5], "n_mismatches": len(mismatches),
        "rss_idle_bytes": rss_idle, "rss_before_bytes": rss_before, "rss_after_bytes": rss_after,
        "rss_after_over_before": rss_after / rss_before,
        "server_health_after": health,
        "example": {"turn": convs[0][0], "answer": flat_single[0]["text"]},
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"server_{a.model}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("mismatches", "example")},
                     indent=1))


if __name__ == "__main__":
    main()
