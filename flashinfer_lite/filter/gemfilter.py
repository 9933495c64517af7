"""GemFilter: an early layer of the model picks the prompt tokens that the rest of it sees.

Pass 1 runs layers 0..r-1 over the whole prompt in chunks (only those layers' KV caches, and
layer r's rotated keys, are held), then scores every token by the last token's query at layer r:
the raw inner product q_last . k_j (after q/k norms and RoPE), summed over heads, smoothed by a
width-5 moving average. The top `keep` tokens stay, in their original order. Pass 2 (the
caller) runs the full model on the kept tokens from position 0, and decodes as usual.
(Shi et al. 2024, "Discovering the Gems in Early Layers", arXiv 2409.17422.)

Beyond the paper: the chat template's structural tokens (control tokens and the role line after
each) and the final user turn (the question) are always kept whole, so pass 2 reads a
well-formed conversation that ends in the question it must answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..cache.kv import KVSpec
from ..config import ModelConfig
from ..errors import InvalidArgumentError
from ..options import FilterOptions
from ..prompt_cache import make_layer_caches

SMOOTH_WIDTH = 5  # the paper's avg_pool1d kernel
STRUCTURE_SPAN = 4  # tokens after a control token that may hold its role line ("user\n")


# Filter layers measured by needle recall (benchmarks/bench_gemfilter.py, results/
# gemfilter_<model>.json): the earliest layer that, and the layer after it, kept the whole pass
# key among the 1,024 tokens kept in every prompt measured (one layer alone can be lucky in 5
# prompts: the 1.5B's layer 8 never missed while its layer 9 did). Keyed by (architecture,
# layers): models of one family and depth share it.
MEASURED_FILTER_LAYERS = {
    ("qwen2", 24): 9,  # Qwen2.5-Coder 0.5B: 5 prompts, 4k and 8k tokens, depths 0.1-0.9
    ("qwen2", 28): 10,  # Qwen2.5-Coder 1.5B: the same 5 prompt shapes
}


def default_filter_layer(cfg: ModelConfig) -> int:
    """Where pass 1 stops. A model whose layer was measured: that layer (Qwen2.5-Coder 0.5B:
    9 of 24, 1.5B: 10 of 28; MEASURED_FILTER_LAYERS). A model that mixes sliding-window and
    global layers: its first global layer (Gemma 3 270M: layer 5; sliding layers cannot see
    past their window, measured in benchmarks/results/gemfilter_gemma3-270m.json). Otherwise
    40% of the depth, the paper's choice (layer 13 of Llama 3.1 8B's 32); not measured here
    for those models."""
    measured = MEASURED_FILTER_LAYERS.get((cfg.architecture, cfg.n_layers))
    if measured is not None:
        return measured
    if cfg.sliding_window is not None:
        for layer in range(1, cfg.n_layers):
            if not cfg.is_sliding(layer):
                return layer
    return max(1, round(0.4 * cfg.n_layers))


def resolve_layer(options: FilterOptions, cfg: ModelConfig) -> int:
    layer = default_filter_layer(cfg) if options.layer is None else int(options.layer)
    if layer >= cfg.n_layers:
        raise InvalidArgumentError(
            f"filter_layer must be below the model's {cfg.n_layers} layers; got {layer}")
    return layer


def smooth(scores: np.ndarray, width: int = SMOOTH_WIDTH) -> np.ndarray:
    """Moving average over `width` neighbours, zeros beyond the ends (avg_pool1d with padding
    width//2, counting the padding), so a token is kept with the words around it."""
    if width % 2 != 1:
        raise ValueError(f"smoothing width must be odd; got {width}")
    return np.convolve(scores, np.full(width, 1.0 / width), mode="same").astype(np.float32)


def select(scores: np.ndarray, keep: int, protected: np.ndarray | None = None) -> np.ndarray:
    """Indices of the kept tokens, ascending: every protected one, then the highest scores
    until `keep` tokens are kept (ties go to the earlier token). Protected tokens beyond `keep`
    are still all kept: they are the structure and the question."""
    n = len(scores)
    if n <= keep:
        return np.arange(n)
    prot = np.zeros(n, bool) if protected is None else np.asarray(protected, bool)
    room = keep - int(prot.sum())
    chosen = np.flatnonzero(prot)
    if room > 0:
        ranked = np.where(prot, -np.inf, np.asarray(scores, np.float64))
        top = np.argsort(-ranked, kind="stable")[:room]
        chosen = np.concatenate([chosen, top])
    return np.sort(chosen)


def protected_mask(ids: Sequence[int], is_control: np.ndarray, token_text: Callable[[int], str],
                   tail_cap: int) -> np.ndarray:
    """Tokens kept whatever their score: control tokens with the role line after each
    ("<start_of_turn>user\\n"), and the question: the final user turn whole when it has at most
    `tail_cap` tokens, else its last line(s) within `tail_cap` tokens. A prompt without a user
    turn (raw text) keeps its last line the same way."""
    ids = np.asarray(ids, np.int64)
    n = len(ids)
    mask = np.zeros(n, bool)
    controls = np.flatnonzero(is_control[ids])
    last_user = None
    for c in controls:
        mask[c] = True
        role = ""
        for j in range(c + 1, min(n, c + 1 + STRUCTURE_SPAN)):
            if is_control[ids[j]]:
                break
            mask[j] = True
            text = token_text(int(ids[j]))
            role += text
            if "\n" in text:
                break
        if role.strip().lower().startswith("user"):
            last_user = c
    if last_user is not None and n - last_user <= tail_cap:
        mask[last_user:] = True
        return mask
    # the question: the last line with content, before any trailing structure
    end = n
    while end > 0 and mask[end - 1]:
        end -= 1
    start = end
    floor = max(0, end - tail_cap)
    while start > floor and "\n" not in token_text(int(ids[start - 1])):
        start -= 1
    mask[start:] = True
    return mask


@dataclass
class FilterResult:
    kept: np.ndarray  # (k,) indices into the prompt, ascending
    kept_ids: list[int]
    scores: np.ndarray  # (N,) smoothed scores
    layer: int
    pass1_s: float
    pass1_bytes: int = 0  # what pass 1 held at its end: layer r's keys + layers < r's caches

    @property
    def tokens_before(self) -> int:
        return len(self.scores)

    @property
    def tokens_after(self) -> int:
        return len(self.kept)


class GemFilter:
    """Pass 1 and the selection for one model: its net (a models.common.CausalLM, run with
    stop_at), the KV cache kind its layers use, the control tokens and each token's text."""

    def __init__(self, net, spec: KVSpec, is_control: np.ndarray,
                 token_text: Callable[[int], str], chunk: int = 256):
        self.net, self.cfg, self.spec, self.is_control = net, net.cfg, spec, is_control
        self.token_text, self.chunk = token_text, chunk

    def scores(self, ids: Sequence[int], layer: int) -> np.ndarray:
        """(N,) raw scores: the last token's query at `layer` against every key there, summed
        over heads (before smoothing). Sets `last_pass1_bytes`."""
        c = self.cfg
        n = len(ids)
        ids = np.asarray(ids, np.int64)
        caches = make_layer_caches(self.net, self.spec)  # only layers < `layer` are written
        # layer r's rotated keys, float16: 16 MB for Gemma 3 at 32k tokens
        keys = np.empty((n, c.n_kv_heads, c.head_dim), np.float16)  # (N, Hkv, D)
        host = self.net.backend.to_host
        core = self.net.cores[layer]
        for s in range(0, n, self.chunk):
            part = ids[s : s + self.chunk]
            q, k, _ = self.net.forward(part, caches, stop_at=layer)
            k = host(k)  # a device backend's (MLX) array -> numpy
            keys[s : s + len(part)] = core.rotate_keys(k, np.arange(s, s + len(part)))
        # only the last query scores: its q alone is copied back and rotated
        q_last, _ = core.rotate(host(q[-1:]), k[-1:], np.array([n - 1]))  # (1, H, D)
        q_last = q_last[0]
        self.last_pass1_bytes = keys.nbytes + sum(c.nbytes for c in caches)
        del caches
        # sum over heads of q_h . k_{kv(h)} = (sum of a KV group's queries) . k_kv
        group = c.n_heads // c.n_kv_heads
        q_sum = q_last.reshape(c.n_kv_heads, group, c.head_dim).sum(axis=1)  # (Hkv, D)
        out = np.empty(n, np.float32)
        step = 8192
        for s in range(0, n, step):
            block = keys[s : s + step].astype(np.float32)  # (S, Hkv, D)
            out[s : s + step] = np.einsum("skd,kd->s", block, q_sum)
        return out

    def protected(self, ids: Sequence[int], keep: int) -> np.ndarray:
        return protected_mask(ids, self.is_control, self.token_text, tail_cap=max(1, keep // 4))

    def __call__(self, ids: Sequence[int], keep: int, layer: int) -> FilterResult:
        t0 = time.perf_counter()
        raw = self.scores(ids, layer)
        smoothed = smooth(raw)
        kept = select(smoothed, keep, self.protected(ids, keep))
        ids = list(ids)
        return FilterResult(kept, [ids[i] for i in kept], smoothed, layer,
                            time.perf_counter() - t0, self.last_pass1_bytes)
