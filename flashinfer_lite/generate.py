"""Generation in three layers (mlx-lm's generate.py), over a network running on a prompt cache:

  Runner           the network and its output head over a PromptCache: chunked prefill, decode
  generate_step    token ids: prefill the prompt, then sample and feed back one at a time
  stream_generate  text: detokenizing, stop strings, end of generation, typed running stats

Model.generate joins stream_generate's text.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidArgumentError
from .filter.budget import PromptMemory
from .filter.gemfilter import FilterResult
from .memory import peak_rss_bytes, rss_bytes
from .prompt_cache import PromptCache
from .sampling import LogitsProcessor, Sampler, greedy
from .speculative import DraftOptions, NgramDrafter, SpeculationStats, speculative_step

# RSS is read (psutil, a /proc read) every this many tokens and at the end of a call
RSS_EVERY = 32
# flash reports whose decode-only share per generated token the stats give
PER_TOKEN_KEYS = ("flash_bytes_read", "flash_reads", "io_s", "memory_management_s", "compute_s",
                  "vocab_bytes_read", "vocab_reads", "head_s", "gate_bytes_read", "gate_wait_s",
                  "gate_compute_s")


class Cancelled(Exception):
    """Raised between two forward chunks when the caller's cancel event is set."""


@dataclass
class GenerationChunk:
    """One step of a stream: the new text (may be empty while a character or a possible stop
    string is incomplete), the token id, and running stats (GenerationStats.as_dict())."""

    text: str
    token: int | None
    stats: dict = field(default_factory=dict)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | None while running


@dataclass
class GenerationStats:
    """One call's numbers, updated as it runs (mlx-lm's GenerationResponse, and ours)."""

    backend: str
    prompt_tokens: int  # as given, before any token filter
    prompt_tokens_reused: int = 0  # already in the prompt cache
    prefill_tokens: int = 0  # run through the model before the first token
    generated_tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    now: float | None = None
    kv_bytes: int = 0
    resident_bytes: int = 0
    rss_bytes: int | None = None  # sampled every RSS_EVERY tokens and at the end
    peak_rss_bytes: int | None = None
    filtered: FilterResult | None = None  # when the prompt was filtered (GemFilter's pass 1)
    filter_pass2_s: float | None = None
    prompt_memory: PromptMemory | None = None  # what the prompt holds, as the budget counts it
    flash: dict = field(default_factory=dict)  # flash and vocabulary reports (per token too)
    speculation: SpeculationStats | None = None  # when drafts were verified
    cancelled: bool = False

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.start

    @property
    def prefill_tokens_per_s(self) -> float | None:
        ttft = self.ttft_s
        return self.prefill_tokens / ttft if ttft else None

    @property
    def tokens_per_s(self) -> float | None:
        """Decoding only: tokens after the first over the time since the first."""
        n, t = self.generated_tokens, self.first_token_at
        return (n - 1) / (self.now - t) if n > 1 and self.now > t else None

    @property
    def decode_s(self) -> float:
        return self.now - self.first_token_at if self.first_token_at is not None else 0.0

    def sample_memory(self) -> None:
        self.rss_bytes, self.peak_rss_bytes = rss_bytes(), peak_rss_bytes()

    def as_dict(self) -> dict:
        """The stats as Model.stats has always given them."""
        f = self.filtered
        out = {"prompt_tokens": self.prompt_tokens,
               "prompt_tokens_reused": self.prompt_tokens_reused,
               "generated_tokens": self.generated_tokens, "backend": self.backend,
               "flash_bytes_read": 0, "flash_reads": 0, "neuron_cache_hit_rate": None,
               "token_filter": "gemfilter" if f else None,
               "filter_tokens_before": self.prompt_tokens,
               "filter_tokens_after": f.tokens_after if f else self.prompt_tokens,
               "filter_layer": f.layer if f else None,
               "filter_pass1_s": f.pass1_s if f else 0.0,
               "filter_pass1_bytes": f.pass1_bytes if f else 0,
               "filter_pass2_s": self.filter_pass2_s, **self.flash}
        if self.speculation is not None:
            out.update(self.speculation.as_dict())
        if self.now is not None:
            out.update(ttft_s=self.ttft_s, prefill_tokens=self.prefill_tokens,
                       prefill_tokens_per_s=self.prefill_tokens_per_s,
                       tokens_per_s=self.tokens_per_s, elapsed_s=self.now - self.start,
                       kv_bytes=self.kv_bytes, resident_bytes=self.resident_bytes,
                       peak_rss_bytes=self.peak_rss_bytes, rss_bytes=self.rss_bytes)
        if self.cancelled:
            out.update(kv_bytes=0, cancelled=True)
        return out


def check_ids(ids: Sequence[int], vocab_size: int, limits) -> list[int]:
    """ids as a list of ints: at least one, each in the vocabulary, fitting the context
    (limits: planning.ContextLimits)."""
    ids = [int(i) for i in ids]
    if not ids:
        raise InvalidArgumentError("need at least one token")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise InvalidArgumentError(f"token id {bad[0]} is outside the vocabulary "
                                   f"(0..{vocab_size - 1})")
    limits.check_prompt(len(ids))
    return ids


class Runner:
    """A network and its output head over a prompt cache.

    net: forward(ids (T,), caches) -> final-normed hidden states (T, d); head(h, exact) ->
    logits (exact=False may be an approximation good for sampling: the two-stage head);
    limits: planning.ContextLimits, checked before every pass."""

    def __init__(self, net, head: Callable[[np.ndarray, bool], np.ndarray], chunk: int, limits):
        self.net, self.head, self.chunk, self.limits = net, head, chunk, limits

    def __call__(self, cache: PromptCache, ids: Sequence[int], out: str = "last",
                 cancel: threading.Event | None = None) -> np.ndarray:
        """Feed ids after what cache holds, in chunks; returns the last position's logits
        (vocab,) (out="last"), every position's (T, vocab) ("all"; "sample": through the head
        generation samples from, as speculative verification needs), or the hidden states
        (T, d) ("hidden"). On an error or Ctrl-C mid-chunk the cache is rolled back to the ids
        it holds; a set cancel event raises Cancelled between chunks."""
        self.limits.check(len(cache.ids) + len(ids), cache)
        outs = []
        try:
            for s in range(0, len(ids), self.chunk):
                if cancel is not None and cancel.is_set():
                    raise Cancelled
                chunk = list(ids[s : s + self.chunk])
                h = self.net.forward(np.asarray(chunk, np.int64), cache.caches)
                cache.ids.extend(chunk)
                if out == "hidden":
                    outs.append(h)
                elif out in ("all", "sample"):
                    outs.append(self.head(h, out == "all"))
                elif s + self.chunk >= len(ids):
                    outs.append(self.head(h[-1:], False))
        except BaseException:
            cache.rollback()
            raise
        return outs[-1][0] if out == "last" else np.concatenate(outs)

    def greedy_tokens(self, cache: PromptCache, ids: Sequence[int], sampler: Sampler,
                      processors: Sequence[LogitsProcessor],
                      cancel: threading.Event | None = None) -> Iterator[int] | None:
        """generate_step's tokens for a greedy sampler with no processors, with each decode
        step queued on the device before the host reads the last token (the backend's
        greedy_pipeline, kernels/mlx_decode.py); None where the backend has no pipeline."""
        backend = getattr(self.net, "backend", None)
        if sampler is not greedy or processors or backend is None:
            return None
        pipeline = backend.greedy_pipeline(self.net, cache.caches)
        if pipeline is None:
            return None

        def check(n_positions: int) -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled
            self.limits.check(n_positions, cache)

        def tokens() -> Iterator[int]:
            first = greedy(self(cache, ids, cancel=cancel))
            yield from pipeline.tokens(first, cache, self.limits.has_room, check)

        return tokens()


def generate_step(
    prefill: Callable[[Sequence[int]], np.ndarray],
    decode: Callable[[int], np.ndarray],
    prompt_ids: Sequence[int],
    sampler: Sampler,
    processors: Sequence[LogitsProcessor] = (),
    history: Sequence[int] = (),
) -> Iterator[int]:
    """Yield token ids forever: prefill the prompt, then sample and feed back one at a time.

    prefill(ids) -> last position's logits (vocab,); decode(token) -> next logits (vocab,).
    history: tokens before the prompt that count for repetition penalties.
    """
    tokens = list(history) + list(prompt_ids)
    logits = prefill(prompt_ids)
    while True:
        for p in processors:
            logits = p(tokens, logits)
        token = sampler(logits)
        tokens.append(token)
        yield token
        logits = decode(token)


class StopMatcher:
    """Holds back text that might be the start of a stop string; cuts at a full match."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        for s in self.stop:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                return out, True
        hold = 0
        for s in self.stop:  # the longest suffix of pending that is a prefix of a stop string
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if s.startswith(self.pending[-n:]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _per_token(report: dict, first: dict | None, n: int, decode_s: float) -> dict:
    """report plus each counter's decode-only share per generated token (after the first)."""
    if not report or not first or n < 2:
        return report
    for key in PER_TOKEN_KEYS:
        if key in report:
            report[f"{key}_per_token"] = (report[key] - first[key]) / (n - 1)
    if "head_s_per_token" in report and decode_s > 0:
        report["head_time_share"] = report["head_s_per_token"] * (n - 1) / decode_s
    return report


def stream_generate(runner: Runner, tokenizer, cache: PromptCache, ids: Sequence[int],
                    max_tokens: int, sampler: Sampler, processors: Sequence[LogitsProcessor],
                    stops: Sequence[str], stats: GenerationStats,
                    flash_report: Callable[[], dict],
                    cancel: threading.Event | None = None,
                    draft: DraftOptions | None = None) -> Iterator[GenerationChunk]:
    """Generate after ids, of which cache already holds the first stats.prompt_tokens_reused.

    Ends at an end-of-generation token or a stop string ("stop"; neither is in the text),
    max_tokens or the context's end ("length"). Raises Cancelled when cancel is set.
    draft: speculative decoding with drafts looked up in the text (speculative.py); not with
    a bounded cache, whose evictions a trim cannot undo."""
    reused = stats.prompt_tokens_reused
    stats.prefill_tokens = len(ids) - reused
    t_pass2 = time.perf_counter()

    def step(n: int, now: float, first: dict | None, finish: str | None) -> None:
        stats.generated_tokens, stats.now = n, now
        stats.flash = _per_token(flash_report(), first, n, stats.decode_s)
        stats.kv_bytes = cache.nbytes
        if finish or n % RSS_EVERY == 1 or stats.rss_bytes is None:
            stats.sample_memory()

    def run(part):
        return runner(cache, part, cancel=cancel)

    if max_tokens == 0:
        run(ids[reused:])
        now = time.perf_counter()
        stats.filter_pass2_s, stats.first_token_at = now - t_pass2, stats.start
        step(0, now, None, "length")
        return
    decoder, matcher = tokenizer.stream_decoder(), StopMatcher(stops)
    if draft is not None and draft.num_draft > 0 and not runner.limits.bounded:
        stats.speculation = SpeculationStats()
        gen = speculative_step(
            run, lambda part: runner(cache, part, out="sample", cancel=cancel), cache.trim,
            ids[reused:], sampler, NgramDrafter(draft), processors, history=ids[:reused],
            stats=stats.speculation, room=lambda: runner.limits.n_ctx - len(cache.ids))
    else:
        gen = (runner.greedy_tokens(cache, ids[reused:], sampler, processors, cancel)
               or generate_step(run, lambda t: run([t]), ids[reused:], sampler, processors,
                                history=ids[:reused]))
    first = None
    n = 0
    try:
        for n, token in enumerate(gen, 1):
            now = time.perf_counter()
            if n == 1:
                stats.first_token_at, stats.filter_pass2_s = now, now - t_pass2
                first = flash_report()
            if tokenizer.is_eog(token):
                step(n, now, first, "stop")
                yield GenerationChunk(matcher.flush() + decoder.flush(), None, stats.as_dict(),
                                      "stop")
                return
            text, hit = matcher.feed(decoder.add(token))
            finish = "stop" if hit else None
            if not hit and (n >= max_tokens or not runner.limits.has_room(len(cache.ids))):
                finish = "length"
                text += matcher.feed(decoder.flush())[0] + matcher.flush()
            step(n, now, first, finish)
            yield GenerationChunk(text, token, stats.as_dict(), finish)
            if finish:
                return
    finally:
        gen.close()
        # the cache holds the prompt and the tokens fed back (all but the last); verified
        # drafts past the last token given out are dropped
        extra = len(cache.ids) - (len(ids) + n - 1)
        if n and extra > 0:
            cache.trim(extra)
