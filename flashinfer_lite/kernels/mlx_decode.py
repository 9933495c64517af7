"""Greedy decoding pipelined on the MLX device, the way mlx-lm's generate_step overlaps the host
and the GPU: the next token never comes back to the host before the next step is queued.

One decode step is a lazy graph from a token id on the device to the next token id on the
device: the embedding row (quantized, gathered and dequantized on the device), the layers
(models/common.py's forward_embedded, with attention and the KV cache on the device), the head
and its argmax. Step n+1's graph is built from step n's lazy token and handed to the GPU
(`mx.async_eval`) before the host waits for step n's id, so the host's Python (building ~30
layers of graph) runs while the GPU computes. Unpipelined, each token costs host time plus GPU
time plus the logits' copy and the host's argmax; pipelined, the larger of the first two.

Greedy only, with no logits processors: the token is chosen on the device, so a host sampler
(temperature, repetition penalty) would have to wait for the logits anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from .mlx_attention import MlxKVCache
from .mlx_weights import GROUP, MlxQuantized, to_mlx_weight


class DeviceEmbedding:
    """The token embedding on the device, kept quantized as the head is: (V, d) in affine
    groups of 32 (exact for the types kernels/mlx_weights.py maps exactly; Q6_K requantized
    to 8 bits as there), or float32 where the type has no group form; rows gathered by id."""

    SLICE_ROWS = 8192  # converted a slice at a time: the host transient stays ~ one slice

    def __init__(self, f, mx, name: str = "token_embd.weight"):
        self.mx = mx
        n = f.tensor(name).shape[0]
        self.bits = None
        parts = []  # per slice: [packed, scales, biases] or [float32 rows], on the device
        for a in range(0, n, self.SLICE_ROWS):
            w = to_mlx_weight(f, name, rows=(a, min(n, a + self.SLICE_ROWS)))
            if isinstance(w, MlxQuantized):
                self.bits = w.bits
                parts.append([mx.array(w.packed), mx.array(w.scales), mx.array(w.biases)])
            else:
                parts.append([mx.array(w)])
            mx.eval(parts[-1])
        self.arrays = [mx.concatenate(list(col)) for col in zip(*parts, strict=True)]
        mx.eval(self.arrays)

    def __call__(self, token):
        """token (1,) int32 on the device -> (1, d) float32."""
        mx = self.mx
        if self.bits is None:
            return self.arrays[0][token]
        packed, scales, biases = (a[token] for a in self.arrays)
        return mx.dequantize(packed, scales, biases, group_size=GROUP, bits=self.bits)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


class GreedyPipeline:
    """Pipelined greedy decoding of one network (models/common.py's CausalLM on MlxBackend).

    Counters for the benchmarks: `host_s`, the host's time building and queueing steps, and
    `wait_s`, its time blocked on the device for a token's id; both since `reset_counters`."""

    def __init__(self, net, mx):
        self.net, self.mx = net, mx
        self.embedding = DeviceEmbedding(net.file, mx)
        self.reset_counters()

    @staticmethod
    def supports(net, caches) -> bool:
        """Whether every piece of a decode step stays on the device: dense FFN, the full head,
        the float16 device cache."""
        return (net.ffn is None and bool(net.head_slices) and net.embed_rows is None
                and all(isinstance(c, MlxKVCache) for c in caches))

    def reset_counters(self) -> None:
        self.host_s = self.wait_s = 0.0
        self.steps = 0

    def step(self, token, caches):
        """Queue one decode step: token (1,) int32 on the device, its position after what the
        caches hold -> the next greedy token (1,) int32, lazy."""
        mx, net = self.mx, self.net
        x = self.embedding(token)
        if net.cfg.embed_scale != 1.0:
            x = x * net.cfg.embed_scale
        h = net.forward_embedded(x, caches)
        logits = mx.concatenate([s(h)[0] for s in net.head_slices], axis=-1)  # (1, V)
        return mx.argmax(logits, axis=-1).astype(mx.int32)

    def tokens(self, first: int, cache, room: Callable[[int], bool],
               check: Callable[[int], None]) -> Iterator[int]:
        """Yield `first`, then greedy tokens, each step queued one token ahead.

        cache: the generation's PromptCache (ids and per-layer caches). As in unpipelined
        decoding, when token n is yielded `cache.ids` holds the tokens before it; the device
        caches already hold token n too (its step is queued), and closing the generator rolls
        them back to `cache.ids`. room(n_ids): whether a step may run after n_ids positions;
        when it may not, the last token is yielded without queueing another step.
        check(n_positions): raises to stop before a step (cancellation, budgets)."""
        mx = self.mx
        y = mx.array([first], mx.int32)
        try:
            while True:
                t0 = time.perf_counter()
                nxt = None
                if room(len(cache.ids)):
                    check(len(cache.ids) + 1)
                    nxt = self.step(y, cache.caches)
                    mx.async_eval(nxt)
                t1 = time.perf_counter()
                token = int(y.item())  # step n's id: the GPU already has step n+1
                self.host_s += t1 - t0
                self.wait_s += time.perf_counter() - t1
                self.steps += 1
                yield token
                if nxt is None:
                    return
                cache.ids.append(token)
                y = nxt
        finally:
            cache.rollback()  # the step queued past the last token given out

    @property
    def nbytes(self) -> int:
        return self.embedding.nbytes
