"""Record the golden outputs that tests/test_golden.py holds the code to.

For each default model (smollm2-135m, gemma3-270m) and each CPU backend (onnxruntime, the
default; numpy, the float32 reference) it writes tests/golden/<model>.<backend>.json with:

- greedy: the 32 greedy token ids after each of four prompts (the decode path: one token at a
  time through the KV cache, from an empty cache), with each step's gap between the best and
  the second-best logit on the prompt path (how near a tie each choice was);
- logits: for the first 128 tokens of real text (pydoc_data.topics), the ids, the top-5 logit
  ids and values at every position, each position's logsumexp, and the perplexity.

Rerun it, from the repository root (``python tests/golden/record.py``), only for a change that
is meant to move these numbers (new kernels or quantization, another llama.cpp tokenizer or
ONNX Runtime version), and say why in the commit: the files hold the outputs of the code that
recorded them, and the test holds every later commit to them. It uses the public API only, so
a refactor cannot change what is measured.
"""

from __future__ import annotations

import argparse
import json
import pydoc_data.topics
from pathlib import Path

import numpy as np

import flashinfer_lite as fl
from flashinfer_lite.evaluation import perplexity

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


def text_ids(m) -> list[int]:
    """The first TEXT_TOKENS ids of the pydoc topics (BOS first where the model adds one)."""
    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return m.tokenize(text[: 8 * TEXT_TOKENS])[:TEXT_TOKENS]


def greedy(m, ids: list[int]) -> list[int]:
    """GREEDY_TOKENS greedy ids after ids, from an empty cache: a reused prefix would change
    how the prompt is cut into chunks, and ONNX Runtime's int8 rounding with it."""
    m.reset()
    return [c.token for c in m.stream(ids, max_tokens=GREEDY_TOKENS, temperature=0.0)
            if c.token is not None]


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """(T,) float64 log of the softmax denominator per row: moves when any logit does."""
    z = logits.astype(np.float64)
    top = z.max(axis=1)
    return top + np.log(np.exp(z - top[:, None]).sum(axis=1))


def measure(m) -> dict:
    """What a golden file holds, measured on a loaded model."""
    out = {"greedy": []}
    for prompt in PROMPTS:
        ids = m.tokenize(prompt)
        gen = greedy(m, ids)
        rows = m.logits(ids + gen)[len(ids) - 1 : len(ids) - 1 + len(gen)]
        best2 = np.sort(rows, axis=1)[:, -2:]
        out["greedy"].append({"prompt": prompt, "prompt_ids": ids, "tokens": gen,
                              "margins": np.round(best2[:, 1] - best2[:, 0], 4).tolist()})
    ids = text_ids(m)
    logits = m.logits(ids)
    top_ids = np.argsort(-logits, axis=1, kind="stable")[:, :TOP]  # (T, TOP), largest first
    out["logits"] = {
        "ids": ids, "top_ids": top_ids.tolist(),
        "top_values": np.round(np.take_along_axis(logits, top_ids, 1), 5).tolist(),
        "logsumexp": np.round(logsumexp(logits), 5).tolist(),
        "perplexity": round(perplexity(logits, ids), 5)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODELS, action="append")
    ap.add_argument("--backend", choices=BACKENDS, action="append")
    ap.add_argument("--out", type=Path, default=HERE,
                    help="folder to write to (another one to compare two runs)")
    ap.add_argument("--threads", type=int, default=THREADS)
    args = ap.parse_args()
    for model in args.model or MODELS:
        for backend in args.backend or BACKENDS:
            with fl.load(model, backend=backend, threads=args.threads) as m:
                data = {"model": model, "backend": backend, **measure(m)}
            path = golden_path(model, backend, args.out)
            path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
            print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
