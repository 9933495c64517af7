"""Peak MLX memory of whole prefills from an empty cache: plain prompts of 1k-8k tokens (the
first tokens of an 8k pass-key prompt) and GemFilter k=1024/2048 on the whole 8k prompt; each
run three times, the last two printed, for each spacing of the attention core's evaluations
in a prefill chunk (`MlxAttentionCore.PREFILL_EVAL_EVERY`; 0 = none, the whole chunk lazy).
GPU machine; prompts from `bench_gemfilter_mlx.py prepare --lengths 8192`.

    python benchmarks/probe_mlx_prefill_chunks.py MODEL.gguf prompts.json.gz [0,1,3]

Output of the H200 run: results/mlx_prefill_peaks_gemma3-270m.txt.
"""
import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemfilter_mlx import install_lookup_tokenizer  # noqa: E402


def main() -> None:
    model, prompts = sys.argv[1], sys.argv[2]
    with gzip.open(prompts, "rt") as fh:
        table = json.load(fh)
    install_lookup_tokenizer(table)
    import mlx.core as mx

    import flashinfer_lite as fl
    from flashinfer_lite.kernels.mlx_attention import MlxAttentionCore

    spacings = [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "0,1,3").split(",")]

    m = fl.load(model, backend="mlx")
    ids = next(p for p in table["prompts"] if p["n"] == 8192)["ids"]
    cases = [("plain", 1024), ("plain", 2048), ("plain", 3910), ("plain", len(ids)),
             ("filter", 1024), ("filter", 2048)]
    for every, rep in [(e, r) for e in spacings for r in range(3)]:
        MlxAttentionCore.PREFILL_EVAL_EVERY = every or 1 << 30
        for kind, n in cases:
            m.reset()
            mx.synchronize()
            mx.clear_cache()
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            kw = ({"token_filter": None} if kind == "plain" else
                  {"token_filter": "gemfilter", "filter_keep": n})
            for _ in m.stream(ids[:n] if kind == "plain" else ids, max_tokens=2, **kw):
                pass
            mx.synchronize()
            if rep:
                peak, held = mx.get_peak_memory() / 1e6, mx.get_active_memory() / 1e6
                print(f"eval every {every}: {kind} {n}: peak {peak:.0f} MB, holds {held:.0f} MB, "
                      f"ttft {m.stats['ttft_s']:.3f} s, call {time.perf_counter() - t0:.3f} s",
                      flush=True)


if __name__ == "__main__":
    main()
