"""Prompt-lookup speculation against a hand-built model whose next-token distribution is a
known function of the context, so sequential decoding is the reference."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from flashinfer_lite.errors import InvalidArgumentError
from flashinfer_lite.generate import generate_step
from flashinfer_lite.sampling import make_sampler
from flashinfer_lite.speculative import (
    DraftOptions,
    NgramDrafter,
    SpeculationStats,
    speculative_step,
)

V = 5


def toy_logits(context: list[int]) -> np.ndarray:
    """A fixed, context-dependent distribution over V tokens (depends on the last two)."""
    a, b = (context[-2:] if len(context) >= 2 else [0, *context[-1:]])
    rng = np.random.default_rng(7 * a + b)
    return rng.normal(0, 2, V).astype(np.float32)


class ToyModel:
    """A 'KV cache' that is the list of fed ids, with the calls a Model makes."""

    def __init__(self):
        self.cache: list[int] = []
        self.passes = 0

    def prefill(self, ids):
        self.cache.extend(ids)
        self.passes += 1
        return toy_logits(self.cache)

    def decode(self, token):
        return self.prefill([token])

    def forward_all(self, ids):
        rows = []
        for t in ids:
            self.cache.append(t)
            rows.append(toy_logits(self.cache))
        self.passes += 1
        return np.stack(rows)

    def trim(self, n):
        if n:
            del self.cache[-n:]


def take(gen, n):
    return list(itertools.islice(gen, n))


def test_drafter_finds_latest_longest_match():
    d = NgramDrafter(DraftOptions(num_draft=3, ngram_max=2, ngram_min=1))
    # last two tokens (7, 8) occur at 1..2 (followed by 9 1 2) and at 5..6 (followed by 4 4 4)
    assert d([0, 7, 8, 9, 1, 7, 8, 4, 4, 4, 7, 8]) == [4, 4, 4]
    assert d([1, 2, 3, 9]) == []  # 9 never occurred before
    assert d([5, 6, 5]) == [6, 5]  # falls back to a 1-gram; the draft runs up to the tail
    assert d([5, 6, 5], limit=1) == [6]
    assert NgramDrafter(DraftOptions(num_draft=0))([1, 1, 1]) == []


@pytest.mark.parametrize("num_draft", [1, 4, 16])
def test_greedy_output_is_unchanged(num_draft):
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    ref_model = ToyModel()
    ref = take(generate_step(ref_model.prefill, ref_model.decode, prompt, make_sampler()), 40)
    model, stats = ToyModel(), SpeculationStats()
    spec = take(speculative_step(model.prefill, model.forward_all, model.trim, prompt,
                                 make_sampler(), NgramDrafter(DraftOptions(num_draft)),
                                 stats=stats), 40)
    assert spec == ref
    # the cache holds exactly the prompt and what was fed back (the last token is pending)
    assert model.cache[: len(prompt) + len(spec) - 1] == prompt + spec[:-1]
    assert stats.accepted > 0 and model.passes < ref_model.passes


def test_sampling_keeps_the_distribution():
    """Three-token continuations drawn with and without speculation: same frequencies."""
    prompt = [1, 2, 1, 2, 1]
    counts = {}
    n = 3000
    for name in ("sequential", "speculative"):
        c = Counter()
        for seed in range(n):
            sampler = make_sampler(temperature=1.0, seed=seed)
            m = ToyModel()
            if name == "sequential":
                gen = generate_step(m.prefill, m.decode, prompt, sampler)
            else:
                gen = speculative_step(m.prefill, m.forward_all, m.trim, prompt, sampler,
                                       NgramDrafter(DraftOptions(4, 2, 1)))
            c[tuple(take(gen, 3))] += 1
        counts[name] = c
    keys = set(counts["sequential"]) | set(counts["speculative"])
    # exact probabilities of each continuation under the toy model
    def prob(seq):
        ctx, p = list(prompt), 1.0
        for t in seq:
            z = toy_logits(ctx).astype(np.float64)
            q = np.exp(z - z.max())
            p *= q[t] / q.sum()
            ctx.append(t)
        return p
    for name in counts:  # chi-square over continuations expected >= 20 times
        stat = sum((counts[name][k] - n * prob(k)) ** 2 / (n * prob(k))
                   for k in keys if n * prob(k) >= 20)
        dof = sum(1 for k in keys if n * prob(k) >= 20) - 1
        assert stat < dof + 5 * np.sqrt(2 * dof), (name, stat, dof)


def test_draft_is_cut_to_the_room_left():
    prompt = [3, 3, 3, 3, 3, 3]
    m = ToyModel()
    seen = []

    def forward_all(ids):
        seen.append(len(ids))
        return m.forward_all(ids)

    take(speculative_step(m.prefill, forward_all, m.trim, prompt, make_sampler(),
                          NgramDrafter(DraftOptions(8)), room=lambda: 3), 6)
    assert max(seen) <= 3


def test_bad_options_name_the_value():
    with pytest.raises(InvalidArgumentError, match="-1"):
        DraftOptions(num_draft=-1)
    with pytest.raises(InvalidArgumentError, match="ngram_min"):
        DraftOptions(ngram_max=1, ngram_min=2)


def _tokens(m, prompt, n, draft, **kw):
    return [c.token for c in m.stream(prompt, max_tokens=n, num_draft_tokens=draft, **kw)
            if c.token is not None]


def test_real_model_greedy_output_is_unchanged(smollm2):
    """SmolLM2 asked to repeat a passage: the same greedy tokens with and without drafts, and
    drafts were accepted. The prompt cache then holds exactly prompt + tokens fed back, so a
    follow-up call that extends the text reuses it and still matches."""
    text = ("def area(width, height):\n    return width * height\n\n"
            "def perimeter(width, height):\n    return 2 * (width + height)\n\n")
    prompt = text + "# the same two functions again:\n" + text[:40]
    plain = _tokens(smollm2, prompt, 48, 0)
    spec = _tokens(smollm2, prompt, 48, 8)
    assert spec == plain
    stats = smollm2.stats
    assert stats["spec_accepted"] > 0 and stats["spec_tokens_per_pass"] > 1.5, stats
    ids = smollm2.tokenize(prompt) + spec
    more_spec = _tokens(smollm2, ids, 16, 8)
    assert smollm2.stats["prompt_tokens_reused"] == len(ids) - 1
    more_plain = _tokens(smollm2, ids, 16, 0)
    assert more_spec == more_plain


def test_real_model_sampling_with_drafts_runs_seeded(smollm2):
    """Sampling with drafts is reproducible for a seed (one draw per emitted token)."""
    prompt = "one two three four five one two three four five one two"
    a = _tokens(smollm2, prompt, 24, 8, temperature=0.8, seed=3)
    b = _tokens(smollm2, prompt, 24, 8, temperature=0.8, seed=3)
    assert a == b and len(a) == 24


def test_draft_length_shrinks_when_drafts_miss_and_grows_back():
    """A drafter that is always wrong: passes shrink to 1 draft; always right: back to 8."""
    prompt = [1, 2, 3]
    ref_model = ToyModel()
    truth = take(generate_step(ref_model.prefill, ref_model.decode, prompt, make_sampler()), 60)

    class Scripted:
        options = DraftOptions(8)

        def __init__(self):
            self.right = False

        def __call__(self, tokens, limit=None):
            n = len(tokens) - len(prompt)  # generated so far; the draft follows them
            good = truth[n : n + limit]
            return good if self.right else [(t + 1) % V for t in good]

    m, seen, drafter = ToyModel(), [], Scripted()

    def forward_all(ids):
        seen.append(len(ids))
        return m.forward_all(ids)

    gen = speculative_step(m.prefill, forward_all, m.trim, prompt, make_sampler(), drafter)
    out = take(gen, 10)
    assert seen[:4] == [9, 5, 3, 2] and seen[-1] == 2
    drafter.right = True
    out += take(gen, 40)
    assert out == truth[:50]
    assert max(seen[-3:]) == 9  # doubled back: 2, 3, 5, 9 drafts+1
