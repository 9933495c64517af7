"""Record the golden outputs that tests/test_golden.py compares against.

For each default model (smollm2-135m, gemma3-270m) and each CPU backend (onnxruntime, the
default; numpy, the float32 reference) it writes tests/golden/<model>.<backend>.json with:

- greedy: the 32 greedy token ids after each of a few prompts (the decode path: one token at a
  time through the KV cache), with each step's gap between the best and second-best logit on
  the prompt path (how close a call was);
- logits: for 128 tokens of real text (the start of pydoc_data.topics), the ids fed, the top-5
  logit ids and values at every position, each position's logsumexp, and the perplexity.

Rerun it (``python tests/golden/record.py``) only when a change is meant to move the numbers
(new kernels, a new quantization, another tokenizer version), and say so in the commit: the
golden files are the outputs of the code at the commit that recorded them, and the test holds
every later commit to them. Only the public API is used, so a refactor cannot change what is
measured.
"""

from __future__ import annotations

import argparse
import json
import pydoc_data.topics
import subprocess
from pathlib import Path

import numpy as np

import flashinfer_lite as fl
from flashinfer_lite.evaluation import log_softmax, perplexity

HERE = Path(__file__).resolve().parent
MODELS = ("smollm2-135m", "gemma3-270m")
BACKENDS = ("onnxruntime", "numpy")
THREADS = 2  # as the test fixtures load them
PROMPTS = [
    "The Python interpreter reads a source file and",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
]
GREEDY_TOKENS = 32
TEXT_TOKENS = 128
TOP = 5


def golden_path(model: str, backend: str, folder: Path = HERE) -> Path:
    return folder / f"{model}.{backend}.json"


def text_ids(m) -> tuple[str, list[int]]:
    """The start of the pydoc topics (real English and code) and its first TEXT_TOKENS ids,
    BOS first where the model uses one."""
    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))[: 8 * TEXT_TOKENS]
    ids = m.tokenize(text)[:TEXT_TOKENS]
    return m.detokenize(ids), ids


def greedy(m, ids: list[int]) -> list[int]:
    return [c.token for c in m.stream(ids, max_tokens=GREEDY_TOKENS, temperature=0.0)
            if c.token is not None]


def top(logits: np.ndarray, k: int = TOP) -> tuple[np.ndarray, np.ndarray]:
    """(T, k) ids and values of the k largest logits per row, largest first."""
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(logits, idx, axis=1)


def measure(m) -> dict:
    """What the golden file holds, measured on a loaded model."""
    out = {"greedy": []}
    for prompt in PROMPTS:
        ids = m.tokenize(prompt)
        gen = greedy(m, ids)
        rows = m.logits(ids + gen)[len(ids) - 1 : len(ids) - 1 + len(gen)]
        best2 = np.sort(rows, axis=1)[:, -2:]
        out["greedy"].append({"prompt": prompt, "prompt_ids": ids, "tokens": gen,
                              "margins": np.round(best2[:, 1] - best2[:, 0], 4).tolist()})
    text, ids = text_ids(m)
    logits = m.logits(ids)
    top_ids, top_values = top(logits)
    lse = logits.max(1) - log_softmax(logits).max(1)  # logsumexp, in float64
    out["logits"] = {"text": text, "ids": ids, "top_ids": top_ids.tolist(),
                     "top_values": np.round(top_values, 5).tolist(),
                     "logsumexp": np.round(lse, 5).tolist(),
                     "perplexity": round(perplexity(logits, ids), 5)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODELS, action="append")
    ap.add_argument("--backend", choices=BACKENDS, action="append")
    ap.add_argument("--out", type=Path, default=HERE,
                    help="folder to write to (another one measures the run-to-run spread)")
    ap.add_argument("--threads", type=int, default=THREADS)
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    for model in args.model or MODELS:
        for backend in args.backend or BACKENDS:
            with fl.load(model, backend=backend, threads=args.threads) as m:
                data = {"model": model, "backend": backend, "recorded_at": commit,
                        **measure(m)}
            path = golden_path(model, backend, args.out)
            path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
            print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
