"""Speculative decoding with drafts from the text itself: decode speed and tokens per pass, with
and without drafts, on a code edit (the answer repeats the prompt's code with a change) and on
fresh generation (a new function), greedy, in one process with the runs alternated.

    python benchmarks/bench_speculative.py [--model qwen2.5-coder-0.5b] [--rounds 2]
                                           [--max-tokens 128] [--draft 8] [--ffn-share 0.5]
                                           [--workloads edit edit_small fresh]

Writes benchmarks/results/speculative_<model>.json. Tokens per pass and equal outputs are exact
counts; tok/s needs a machine with nothing else running.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import textwrap
from pathlib import Path

import flashinfer_lite as fl
from flashinfer_lite import registry, speculative

RESULTS = Path(__file__).resolve().parent / "results"


def workloads() -> dict[str, list[dict]]:
    """Chat messages: the edit quotes this repository's own code (~1.5k tokens)."""
    code = textwrap.dedent(inspect.getsource(registry))[:5000]
    draft_code = inspect.getsource(speculative.NgramDrafter)
    return {
        "edit": [{"role": "user", "content": "Rename the class PartedModel to PackagedModel "
                  "everywhere in this code and print the whole file:\n\n```python\n"
                  f"{code}\n```"}],
        "edit_small": [{"role": "user", "content": "Add type hints to `__init__` and print the "
                        f"class again:\n\n```python\n{draft_code}\n```"}],
        "fresh": [{"role": "user", "content": "Write a Python function that parses an ISO 8601 "
                   "date string and returns the weekday name, with a docstring."}],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--draft", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workloads", nargs="+", default=list(workloads()),
                    choices=list(workloads()))
    ap.add_argument("--ffn-share", type=float, default=None,
                    help="FFN share in DRAM (the flash path; flash reads are reported)")
    a = ap.parse_args()
    m = fl.load(a.model, threads=a.threads, ffn_share=a.ffn_share)
    runs = {}
    for r in range(a.rounds):
        for name in a.workloads:
            messages = workloads()[name]
            ids = m.apply_chat_template(messages)
            for draft in (0, a.draft):
                m.reset()  # every run prefills the whole prompt
                tokens = [c.token for c in m.stream(ids, max_tokens=a.max_tokens,
                                                    num_draft_tokens=draft)
                          if c.token is not None]
                s = m.stats
                rec = {"tokens": tokens, "tokens_per_s": s["tokens_per_s"],
                       "ttft_s": s["ttft_s"], "prompt_tokens": len(ids),
                       "tokens_per_pass": s.get("spec_tokens_per_pass") or 1.0,
                       "drafted": s.get("spec_drafted", 0), "accepted": s.get("spec_accepted", 0),
                       "flash_bytes_read": s.get("flash_bytes_read", 0),
                       "flash_reads": s.get("flash_reads", 0)}
                runs.setdefault((name, draft), []).append(rec)
                print(f"round {r} {name} draft={draft}: {rec['tokens_per_s']:.2f} tok/s, "
                      f"{rec['tokens_per_pass']:.2f} tokens/pass", flush=True)
    report = {"benchmark": "speculative", "model": a.model, "threads": a.threads,
              "ffn_share": a.ffn_share,
              "rounds": a.rounds, "max_tokens": a.max_tokens, "draft": a.draft, "workloads": {}}
    for name in a.workloads:
        off, on = runs[(name, 0)], runs[(name, a.draft)]
        med = lambda rs, k: statistics.median(x[k] for x in rs)  # noqa: E731
        report["workloads"][name] = {
            "prompt_tokens": off[0]["prompt_tokens"], "generated": len(off[0]["tokens"]),
            "same_output": all(x["tokens"] == off[0]["tokens"] for x in off + on),
            "tokens_per_s_off": med(off, "tokens_per_s"),
            "tokens_per_s_on": med(on, "tokens_per_s"),
            "speedup": med(on, "tokens_per_s") / med(off, "tokens_per_s"),
            "tokens_per_pass": on[0]["tokens_per_pass"], "drafted": on[0]["drafted"],
            "accepted": on[0]["accepted"],
            "flash_bytes_per_token_off": off[0]["flash_bytes_read"] / len(off[0]["tokens"]),
            "flash_bytes_per_token_on": on[0]["flash_bytes_read"] / len(on[0]["tokens"])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if a.ffn_share is None else f"_share{a.ffn_share:g}"
    out = RESULTS / f"speculative_{a.model}{suffix}.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["workloads"], indent=2))


if __name__ == "__main__":
    main()
