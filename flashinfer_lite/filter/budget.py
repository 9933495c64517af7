"""A prompt's memory under the budget, counted before it runs, and what `token_filter="auto"`
chooses from it.

What one call holds beyond the loaded model (`ContextLimits.held_bytes`: weights, pools and
32 MiB of working memory), at its peak:

- unfiltered: the KV cache of every prompt token, and a prefill chunk's activations;
- filtered (GemFilter): pass 1 holds layers 0..r-1's caches over the whole prompt (q8/q4 when
  the model's cache is), layer r's float16 keys and one scoring block, beside the prompt cache
  the last call left (pass 1 runs before that cache is reused); pass 1's state is freed before
  pass 2, whose KV cache holds the kept tokens only. Chunk activations come on top of either.

Caches of each kind are made once, empty, and only asked what they would hold (`bytes_at`):
nothing here allocates a prompt's memory to find out whether it fits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from ..cache.kv import KVSpec
from ..errors import InvalidArgumentError, KVBudgetError
from ..kernels.prefill_attention import BLOCK
from ..memory import WORKING_BYTES, format_bytes
from ..options import FilterOptions

SCORE_BLOCK = 8192  # keys GemFilter.scores converts to float32 at a time


def activation_bytes(cfg, chunk: int, context: int) -> int:
    """A prefill chunk's float32 temporaries at their largest, from the shapes. An ONNX Runtime
    segment's (the residual stream and norms, 3 x d; q/k/v; the FFN's gate, up and product,
    3 x ffn) and the attention's (kernels/prefill_attention.py: one BLOCK of positions' scores,
    masked, 2 x heads x chunk x BLOCK, with its keys and values in float32) are not live at
    once: the sessions run without a memory arena, so each run frees its intermediates."""
    rows = min(chunk, context)
    segment = rows * (3 * cfg.d_model + (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
                      + 3 * cfg.ffn_dim)
    block = min(context, BLOCK)
    attention = 2 * cfg.n_heads * rows * block + 2 * cfg.n_kv_heads * block * cfg.head_dim
    return 4 * max(segment, attention)


@dataclass(frozen=True)
class PromptMemory:
    """What running one prompt holds beyond the loaded model, by part (bytes)."""

    tokens: int  # the prompt's tokens
    kept: int  # the tokens pass 2 runs (all of them when unfiltered)
    kind: str  # the KV cache kind counted
    layer: int | None  # GemFilter's filter layer; None when unfiltered
    kv_bytes: int  # the KV cache once the prompt (the kept tokens) is in
    pass1_bytes: int  # pass 1: layers < r's caches over every token, layer r's keys, a block
    held_cache_bytes: int  # the prompt cache the last call left, held during pass 1
    activation_bytes: int  # a prefill chunk's temporaries

    @property
    def filtered(self) -> bool:
        return self.layer is not None

    @property
    def cache_peak_bytes(self) -> int:
        """Caches at their largest: pass 1 beside the old cache, or pass 2's."""
        return max(self.held_cache_bytes + self.pass1_bytes, self.kv_bytes)

    @property
    def beyond_working_bytes(self) -> int:
        """What must fit in the budget left after the model (which reserves WORKING_BYTES
        of working memory already): the caches' peak and the activations beyond that."""
        return self.cache_peak_bytes + max(0, self.activation_bytes - WORKING_BYTES)

    def describe(self) -> str:
        parts = [f"KV cache of {self.kept} tokens {format_bytes(self.kv_bytes)} ({self.kind})"]
        if self.filtered:
            parts.append(f"GemFilter's pass 1 {format_bytes(self.pass1_bytes)} (layers "
                         f"0-{self.layer - 1}'s caches and layer {self.layer}'s keys over "
                         f"{self.tokens} tokens)")
            if self.held_cache_bytes:
                parts.append(f"the previous call's cache {format_bytes(self.held_cache_bytes)}"
                             " during pass 1")
        extra = max(0, self.activation_bytes - WORKING_BYTES)
        parts.append(f"activations {format_bytes(self.activation_bytes)}, "
                     f"{format_bytes(extra)} beyond the working memory the model reserves")
        return ", ".join(parts)


class PromptBudget:
    """One model's prompts against its memory budget.

    make_caches(spec): an empty KV cache per layer of that kind (counted, never filled);
    limits: planning.ContextLimits (the budget, what the model holds besides its KV cache);
    pools_from_budget: the planner gave the neuron pools what the budget left after a KV
    reserve of kv_reserve_tokens (a larger budget alone would go to the pools)."""

    def __init__(self, cfg, make_caches: Callable[[KVSpec], list], spec: KVSpec, chunk: int,
                 limits, pools_from_budget: bool = False):
        self.cfg, self.make_caches, self.spec, self.chunk = cfg, make_caches, spec, chunk
        self.limits, self.pools_from_budget = limits, pools_from_budget
        self._caches: dict[KVSpec, list] = {}

    def _counted(self, spec: KVSpec) -> list:
        if spec not in self._caches:
            self._caches[spec] = self.make_caches(spec)
        return self._caches[spec]

    def clear(self) -> None:
        """Drop the counted caches (they refer to the model's layers: a closed model's go)."""
        self._caches.clear()

    def kv_bytes(self, n_tokens: int, spec: KVSpec | None = None,
                 layers: int | None = None) -> int:
        """Bytes the caches of layers[:layers] hold after n_tokens positions."""
        caches = self._counted(spec or self.spec)[:layers]
        return sum(c.bytes_at(n_tokens, self.chunk) for c in caches)

    def memory(self, n_tokens: int, filter_layer: int | None, keep: int,
               held_cache_bytes: int = 0, spec: KVSpec | None = None) -> PromptMemory:
        """The parts of a prompt of n_tokens: filtered at filter_layer keeping `keep` tokens,
        or unfiltered (filter_layer None, or a prompt that fits in `keep` anyway)."""
        spec = spec or self.spec
        c = self.cfg
        filtered = filter_layer is not None and n_tokens > keep
        kept = keep if filtered else n_tokens
        pass1 = 0
        if filtered:
            keys = n_tokens * c.n_kv_heads * c.head_dim
            pass1 = (self.kv_bytes(n_tokens, spec, filter_layer) + 2 * keys  # float16 keys
                     + 4 * min(n_tokens, SCORE_BLOCK) * c.n_kv_heads * c.head_dim)
        return PromptMemory(n_tokens, kept, spec.kind, filter_layer if filtered else None,
                            self.kv_bytes(kept, spec), pass1,
                            held_cache_bytes if filtered else 0,
                            activation_bytes(c, self.chunk, n_tokens))

    @property
    def room(self) -> int | None:
        """Bytes the budget leaves a prompt after the model (None: no budget)."""
        return self.limits.kv_budget_bytes

    def fits(self, mem: PromptMemory) -> bool:
        room = self.room
        return room is None or mem.beyond_working_bytes <= room

    def filters(self, options: FilterOptions, n_tokens: int) -> bool:
        """Whether a prompt of n_tokens is filtered: options.applies, with auto told whether
        the unfiltered prompt fits the budget."""
        if options.mode != "auto" or self.room is None:
            return options.applies(n_tokens)
        fits = self.fits(self.memory(n_tokens, None, options.keep))
        return options.applies(n_tokens, fits_unfiltered=fits)

    def plan(self, n_tokens: int, options: FilterOptions, layer: int,
             held_cache_bytes: int = 0) -> PromptMemory:
        """A prompt of n_tokens as it would run: filtered or not (auto decided here), its
        memory counted beside held_cache_bytes of prompt cache."""
        filtered = self.filters(options, n_tokens)
        return self.memory(n_tokens, layer if filtered else None, options.keep,
                           held_cache_bytes)

    def check(self, mem: PromptMemory, options: FilterOptions, layer: int) -> None:
        """KVBudgetError when mem does not fit the budget, naming what would make it fit
        (a q4 cache, the token filter, both, a larger budget)."""
        if self.fits(mem):
            return
        need = mem.beyond_working_bytes
        held, budget = self.limits.held_bytes, self.limits.budget
        options_that_fit = []
        for label, spec, filt in self._alternatives(mem.filtered, mem.tokens, options.keep):
            alt = self.memory(mem.tokens, layer if filt else None, options.keep,
                              mem.held_cache_bytes, spec)
            if self.fits(alt):
                options_that_fit.append(
                    f"{label} (needs {format_bytes(alt.beyond_working_bytes)})")
        hint = "; it would fit with " + ", or ".join(options_that_fit) if options_that_fit else ""
        if self.pools_from_budget:  # the pools shrink to leave a larger reserve
            room = f"kv_reserve_tokens={self.reserve_tokens_for(need)}"
        else:
            room = f"a memory_budget of at least {format_bytes(held + need)}"
        raise KVBudgetError(
            f"a prompt of {mem.tokens} tokens needs {format_bytes(need)} ({mem.describe()}); "
            f"the memory budget of {format_bytes(budget)} leaves "
            f"{format_bytes(max(self.room, 0))} after {format_bytes(held)} of weights and "
            f"working memory{hint}; or give {room}")

    def reserve_tokens_for(self, need: int) -> int:
        """The fewest KV reserve tokens (a multiple of 256) whose reserve holds `need` bytes."""
        n = 256
        while self.kv_bytes(n) < need and n < 1 << 24:
            n += 256
        return n

    def _alternatives(self, filtered: bool, n_tokens: int, keep: int):
        """(option text, KV spec, filtered) of the options a user can change to fit."""
        q4 = None
        if self.spec.kind != "q4":
            try:
                q4 = dataclasses.replace(self.spec, kind="q4")
            except InvalidArgumentError:  # a window the q4 residual does not fit
                q4 = None
        can_filter = not filtered and n_tokens > keep
        if q4 is not None:
            yield "kv_cache='q4'", q4, filtered
        if can_filter:
            yield "token_filter='gemfilter'", self.spec, True
        if q4 is not None and can_filter:
            yield "token_filter='gemfilter' and kv_cache='q4'", q4, True
