"""Memory planning at load time (what goes to flash, how large the neuron pools are) and the
limits every forward pass checks (the context, the KV cache's share of the budget).

The split of one budget among resident weights, KV reserve, read buffers and neuron pools is
flash/planner.py's; this module decides when it applies and feeds it what was measured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import psutil

from .errors import ContextLengthError, KVBudgetError
from .flash.ffn import FlashFFN
from .flash.planner import WORKING_BYTES, Plan, plan
from .memory import format_bytes
from .options import FlashOptions, KVOptions
from .prompt_cache import make_layer_caches

# measured: dense SmolLM2 172 MB and Gemma 3 486 MB of RSS over ORT's process state
# (weights ~1x in ORT; llama.cpp's tokenizer 25 MB / more for Gemma's 262k tokens)
DENSE_RSS_PER_FILE_BYTE = 1.9
# The resident part of a flash model with its head measured ~2x the resident file in RSS
# (SmolLM2: 128 MB for 65 MB: Q4_1 weights ~1.4x in ORT, plus the tokenizer's 25 MB).
RESIDENT_RSS_PER_FILE_BYTE = 2.0
# (T, ffn) float32 arrays a prompt chunk holds at once in the flash FFN (flash/ffn.py)
PREFILL_ROW_ARRAYS = 3
# a prompt chunk's attention: scores, their exponentials and weights (H, T, keys) float32, keys
# taken ATTENTION_BLOCK at a time (kernels/prefill_attention.py)
ATTENTION_COPIES = 3
ATTENTION_BLOCK = 1024
# share of the FFN bundles the pools should hold for the head to stay resident
POOL_SHARE_BESIDE_HEAD = 0.25


def kv_reserve_bytes(backend, cfg, kv: KVOptions, n_ctx: int, chunk: int) -> int:
    """An upper estimate before the model is built: every layer caching kv.reserve_tokens
    positions (unbounded; sliding layers counted whole), as the caches themselves count it."""
    spec = replace(kv.spec, window=None)
    caches = backend.make_kv_caches(spec, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    return sum(c.bytes_at(min(kv.reserve_tokens, n_ctx), chunk) for c in caches)


def needs_flash(budget: int | None, model_bytes: int, kv_reserve: int) -> bool:
    """A budget below what the dense model costs in RSS (~1.9x the file with the tokenizer
    and load leftovers) plus the KV reserve switches to the flash format, where the planner
    measures the resident part and sizes the rest."""
    return budget is not None and budget < DENSE_RSS_PER_FILE_BYTE * model_bytes + kv_reserve


def vocab_needs_flash(budget: int | None, manifest, kv_reserve: int) -> bool:
    """The planner's first choice: the head stays resident if it fits the budget next to the
    other resident weights, the KV reserve and a share of the FFN's bundles; else the
    vocabulary goes to flash (two-stage head)."""
    if budget is None:
        return False
    files = manifest.data["files"]
    head = manifest.vocab["rows"] * manifest.vocab["row_bytes"]
    resident = files["resident.gguf"]["size"] - (0 if manifest.vocab["tied"] else head)
    need = (RESIDENT_RSS_PER_FILE_BYTE * resident + kv_reserve + WORKING_BYTES
            + POOL_SHARE_BESIDE_HEAD * files["ffn.bin"]["size"])
    return budget < need


def pool_plan(budget: int | None, resident_bytes: int, net, layout, kv: KVOptions,
              flash: FlashOptions, n_ctx: int, chunk: int) -> Plan | None:
    """The neuron pools' size from what the budget leaves (None when flash.ffn_share fixes
    it). Without a budget, half of the memory available now."""
    if flash.ffn_share is not None:
        return None
    if budget is None:
        budget = int(psutil.virtual_memory().available * 0.5)
    # the KV reserve from the caches this model makes (Gemma 3's sliding layers keep 512 +
    # slack positions, not kv.reserve_tokens)
    kv_tokens = min(kv.reserve_tokens, n_ctx)
    kv_reserve = sum(c.bytes_at(kv_tokens, chunk) for c in make_layer_caches(net, kv.spec))
    # staging: the bundle reads, the gate's ring of two layers, each pool's index of where
    # its neurons sit; and a prompt chunk's transients: its (T, ffn) float32 arrays in the FFN
    # (gate/score, activation, the dense path's blocks) and its attention scores (heads x T x
    # up to a block of keys, a few copies): 14 + 19 MB on the 1.5B at 128-token chunks. The
    # lookahead's buffers (decoding only) give their pages back when a prompt chunk comes
    # (flash/ffn.py): the larger of the two
    rows = min(chunk, n_ctx, FlashFFN.ROW_BLOCK)
    transient = (PREFILL_ROW_ARRAYS * rows * layout.ffn_dim * 4
                 + ATTENTION_COPIES * net.cfg.n_heads * min(chunk, n_ctx)
                 * min(kv_tokens, ATTENTION_BLOCK) * 4)
    ring = FlashFFN.prefetch_bytes(layout) if flash.prefetch and flash.mode == "ours" else 0
    staging = (layout.section + 2 * layout.gate_section + max(transient, ring)
               + net.cfg.n_layers * FlashFFN.pool_fixed_bytes(layout))
    return replace(plan(budget, resident_bytes, kv_reserve, kv_tokens, staging,
                        FlashFFN.bytes_per_neuron(layout), net.cfg.n_layers, net.cfg.ffn_dim,
                        layout.gate_bytes), transient_bytes=transient)


@dataclass(frozen=True)
class ContextLimits:
    """What a forward pass may hold: the context length (unless every cache is bounded) and,
    under a memory budget, the bytes left for the KV cache."""

    n_ctx: int
    bounded: bool  # every layer's cache is bounded: a context may run past n_ctx
    kv_kind: str
    chunk: int  # prefill chunk (how a bounded cache's size levels off)
    budget: int | None  # the memory budget (None: none given)
    held_bytes: int  # what the model holds besides its KV cache, as the planner counts it

    @property
    def kv_budget_bytes(self) -> int | None:
        return None if self.budget is None else self.budget - self.held_bytes

    def has_room(self, n_positions: int) -> bool:
        """Whether one more position fits after n_positions."""
        return self.bounded or n_positions + 1 < self.n_ctx

    def check_prompt(self, n_tokens: int) -> None:
        if n_tokens > self.n_ctx and not self.bounded:
            raise ContextLengthError(
                f"the prompt has {n_tokens} tokens; the context holds {self.n_ctx}")

    def check(self, n_positions: int, cache) -> None:
        """Raise ContextLengthError / KVBudgetError if cache (a PromptCache) cannot hold
        n_positions."""
        if n_positions > self.n_ctx and not self.bounded:
            raise ContextLengthError(
                f"{n_positions} tokens do not fit the context of {self.n_ctx} tokens")
        left = self.kv_budget_bytes
        if left is None:
            return
        need = cache.bytes_at(n_positions, self.chunk)
        if need > left:
            hint = ("; a smaller kv_window would fit" if self.bounded else
                    "; try kv_cache='q4', a bounded cache (kv_window=...), or a larger budget")
            raise KVBudgetError(
                f"a context of {n_positions} tokens needs {format_bytes(need)} of KV cache "
                f"({self.kv_kind}); the memory budget of {format_bytes(self.budget)} "
                f"leaves {format_bytes(max(left, 0))} after {format_bytes(self.held_bytes)} "
                f"of weights and working memory{hint}")
