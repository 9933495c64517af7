"""Where a call's peak MLX memory is reached: GemFilter's pass 1, the prefill (pass 2 for a
filtered call) and the decode, for full attention and GemFilter k=1024 / 2048 on the first
prompt of each length that bench_gemfilter_mlx.py `prepare` wrote (GPU machine; run twice per
mode, the second printed, so kernels are compiled). Each mark synchronizes, reads MLX's active
memory and the peak since the last mark, and resets the peak.

    python benchmarks/probe_gemfilter_mlx_memory.py MODEL.gguf prompts.json.gz 2048,8192 1024,2048

Output of the H200 run: results/gemfilter_gemma3-270m_mlx_gpu_memory_probe.txt.
"""

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemfilter_mlx import install_lookup_tokenizer  # noqa: E402


def main() -> None:
    model, prompts = sys.argv[1], sys.argv[2]
    lengths = [int(x) for x in sys.argv[3].split(",")]
    keeps = [int(x) for x in sys.argv[4].split(",")]
    with gzip.open(prompts, "rt") as fh:
        table = json.load(fh)
    install_lookup_tokenizer(table)
    import mlx.core as mx

    import flashinfer_lite as fl

    m = fl.load(model, backend="mlx")
    ev = []

    def mark(name):
        mx.synchronize()
        ev.append((name, round(mx.get_active_memory() / 1e6), round(mx.get_peak_memory() / 1e6)))
        mx.reset_peak_memory()

    real_filter, real_fwd = m.filter_prompt, m.runner

    def filt(*a, **kw):
        mark("before pass1")
        r = real_filter(*a, **kw)
        mark("pass1")
        return r

    def fwd(cache, ids, *a, **kw):
        r = real_fwd(cache, ids, *a, **kw)
        if len(ids) > 1:
            mark(f"prefill {len(ids)}")
        return r

    m.filter_prompt, m.runner = filt, fwd
    for n in lengths:
        p = next(p for p in table["prompts"] if p["n"] == n)
        for rep in range(2):
            for keep in [None, *keeps]:
                m.reset()
                mx.synchronize()
                mx.clear_cache()
                mx.reset_peak_memory()
                ev.clear()
                mark("start")
                kw = ({"token_filter": None} if keep is None else
                      {"token_filter": "gemfilter", "filter_keep": keep})
                for _ in m.stream(p["ids"], max_tokens=8, **kw):
                    pass
                mark("decode")
                if rep:
                    print(n, keep, ev, flush=True)


if __name__ == "__main__":
    main()
