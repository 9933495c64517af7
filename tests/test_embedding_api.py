"""The in-process API as a desktop app uses it: threads sharing one Model, cancelling a
generation from another thread, per-conversation caches (swap_cache), close / context manager,
and progress callbacks while a first load converts the model."""

from __future__ import annotations

import threading

import pytest

import flashinfer_lite as fl

GREEDY = {"temperature": 0.0}


def test_cancel_from_another_thread_stops_and_frees_the_cache(smollm2):
    stop = threading.Event()
    chunks = []
    for chunk in smollm2.stream("1, 2, 3, 4,", max_tokens=300, cancel=stop, **GREEDY):
        chunks.append(chunk)
        if len(chunks) == 3:
            threading.Thread(target=stop.set).start()  # a "Stop" button on the UI thread
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].token is None
    assert len(chunks) < 10  # it stopped within a token or two of the event
    assert smollm2.kv_bytes == 0 and smollm2.stats["cancelled"]
    # the model goes on: the same prompt gives the same greedy answer as before
    a = smollm2.generate("1, 2, 3, 4,", max_tokens=4, **GREEDY)
    smollm2.reset()
    assert smollm2.generate("1, 2, 3, 4,", max_tokens=4, **GREEDY) == a


def test_cancel_before_start_runs_nothing(smollm2):
    stop = threading.Event()
    stop.set()
    chunks = list(smollm2.stream("Hello", max_tokens=5, cancel=stop))
    assert [c.finish_reason for c in chunks] == ["cancelled"]
    assert smollm2.kv_bytes == 0


def test_threads_sharing_a_model_get_their_own_answers(smollm2):
    prompts = ["1, 2, 3, 4,", "The capital of France is", "def fibonacci(n):"]
    want = []
    for p in prompts:
        smollm2.reset()
        want.append(smollm2.generate(p, max_tokens=5, **GREEDY))
    smollm2.reset()  # else the thread that repeats the last prompt would reuse its cache
    got = [None] * len(prompts)

    def work(i):
        got[i] = smollm2.generate(prompts[i], max_tokens=5, **GREEDY)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # these prompts share no prefix, so each thread's call is a fresh prefill, as above
    assert got == want


def test_second_open_stream_in_one_thread_is_refused(smollm2):
    smollm2.reset()
    want = smollm2.generate("4, 5, 6,", max_tokens=2, **GREEDY)
    first = smollm2.stream("1, 2, 3,", max_tokens=3)
    next(first)
    with pytest.raises(fl.InvalidArgumentError, match="still open"):
        next(smollm2.stream("4, 5, 6,", max_tokens=3))
    first.close()  # closing releases the model, which answers as before
    assert smollm2.generate("4, 5, 6,", max_tokens=2, **GREEDY) == want


def test_swap_cache_keeps_two_conversations(smollm2):
    a = [{"role": "user", "content": "Name a fruit."}]
    b = [{"role": "user", "content": "Name a color."}]
    smollm2.swap_cache(None)
    reply_a = smollm2.chat(a, max_tokens=4, **GREEDY)
    state_a = smollm2.swap_cache(None)  # park A, start B empty
    held = len(state_a.ids)  # prompt + reply but its last token (sampled, never fed back)
    assert state_a.nbytes > 0 and smollm2.kv_bytes == 0
    smollm2.chat(b, max_tokens=4, **GREEDY)
    smollm2.swap_cache(state_a)  # back to A: its next turn prefills only what is new
    a += [{"role": "assistant", "content": reply_a}, {"role": "user", "content": "Another?"}]
    smollm2.chat(a, max_tokens=2, **GREEDY)
    assert smollm2.stats["prompt_tokens_reused"] == held
    foreign = fl.KVState(list(state_a.ids), state_a.caches, owner=id(object()))
    with pytest.raises(fl.InvalidArgumentError, match="another Model"):
        smollm2.swap_cache(foreign)  # caches shaped for some other model are refused


def test_close_and_context_manager(smollm2_path, smollm2):
    smollm2.reset()
    want = smollm2.generate("Hi", max_tokens=2, **GREEDY)
    with fl.load(smollm2_path, threads=2) as m:  # its own model: closing it is the test
        assert m.generate("Hi", max_tokens=2, **GREEDY) == want
    with pytest.raises(fl.InvalidArgumentError, match="closed"):
        m.generate("Hi", max_tokens=1)


def test_progress_callback_sees_first_load_conversion_and_can_stop_it(smollm2_path, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no conversion cached yet
    calls = []

    class Stop(Exception):
        pass

    def progress(step, total, what):
        calls.append((step, total, what))
        raise Stop  # the user pressed Cancel on the first progress report

    with pytest.raises(Stop):
        fl.load(smollm2_path, ffn_share=0.5, progress=progress)
    (step, total, what), = calls
    assert step == 0 and total > 30 and "calibrat" in what  # a step per layer (30) and more
    flash = tmp_path / "flashinfer-lite" / "flash"
    assert not flash.exists() or not any(flash.iterdir())  # nothing half-written is left
