"""Samplers on hand-built logits: what each filter admits, seeds, penalties, bad arguments."""

import numpy as np
import pytest

from flashinfer_lite.errors import FlashInferError, InvalidArgumentError
from flashinfer_lite.generate import StopMatcher
from flashinfer_lite.sampling import make_repetition_penalty, make_sampler

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32))


def draws(sampler, n=2000):
    return np.array([sampler(LOGITS) for _ in range(n)])


def test_greedy_takes_argmax():
    assert make_sampler(0.0)(np.array([0.1, 3.0, 2.9])) == 1


def test_top_k_limits_support():
    seen = set(draws(make_sampler(1.0, top_k=2, top_p=1.0, min_p=0.0, seed=0)).tolist())
    assert seen == {0, 1}


def test_top_p_keeps_smallest_set_reaching_p():
    # cumulative 0.5, 0.7, 0.85: p = 0.75 needs the first three tokens
    seen = set(draws(make_sampler(1.0, top_p=0.75, min_p=0.0, seed=1)).tolist())
    assert seen == {0, 1, 2}


def test_min_p_drops_tokens_below_fraction_of_best():
    # min_p 0.25 of 0.5 = 0.125: keeps 0.5, 0.2, 0.15
    seen = set(draws(make_sampler(1.0, min_p=0.25, seed=2)).tolist())
    assert seen == {0, 1, 2}


def test_temperature_one_matches_distribution():
    counts = np.bincount(draws(make_sampler(1.0, top_p=1.0, min_p=0.0, seed=3), 20000),
                         minlength=5) / 20000
    np.testing.assert_allclose(counts, np.exp(LOGITS), atol=0.015)


def test_seed_reproduces_and_differs():
    a = draws(make_sampler(1.5, min_p=0.0, seed=7), 200)
    b = draws(make_sampler(1.5, min_p=0.0, seed=7), 200)
    c = draws(make_sampler(1.5, min_p=0.0, seed=8), 200)
    assert (a == b).all() and (a != c).any()


def test_repetition_penalty_follows_llama_cpp_rule():
    proc = make_repetition_penalty(2.0, last_n=2)
    out = proc([9, 0, 1], np.array([4.0, -4.0, 4.0]))
    # only the last 2 tokens (0, 1) count: positive divided, negative multiplied
    np.testing.assert_allclose(out, [2.0, -8.0, 4.0])
    assert make_repetition_penalty(1.0) is None


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(temperature=float("nan")),
                                dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                dict(min_p=1.0)])
def test_bad_arguments_raise_with_the_value(kw):
    with pytest.raises(InvalidArgumentError) as err:
        make_sampler(**kw)
    assert isinstance(err.value, FlashInferError)
    assert repr(next(iter(kw.values()))) in str(err.value)


def test_stop_matcher_holds_back_partial_and_cuts():
    m = StopMatcher(["</s>", "END"])
    assert m.feed("hello </") == ("hello ", False)
    assert m.feed("s> more") == ("", True)
    m = StopMatcher(["END"])
    assert m.feed("E") == ("", False)
    assert m.feed("x") == ("Ex", False)
    assert m.flush() == ""
