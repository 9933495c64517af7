"""Options, the prompt cache and the per-call stats without a model: fl.load's flat keywords land
on the option dataclasses, the CLI's defaults are theirs, bad values name themselves, a prompt
cache reuses exactly its common prefix, and the stats read as they are documented."""

import dataclasses

import numpy as np
import pytest

from flashinfer_lite.cache.kv import KVSpec, make_kv_caches
from flashinfer_lite.cli.chat_loop import stats_lines
from flashinfer_lite.cli.main import app
from flashinfer_lite.errors import InvalidArgumentError
from flashinfer_lite.filter.gemfilter import FilterResult
from flashinfer_lite.generate import GenerationStats
from flashinfer_lite.options import (
    FilterOptions,
    FlashOptions,
    KVOptions,
    LoadOptions,
    RuntimeOptions,
    SamplingOptions,
    ServerOptions,
    kwarg_names,
)
from flashinfer_lite.prompt_cache import PromptCache, common_prefix


def test_flat_keywords_land_on_the_dataclasses():
    o = LoadOptions.from_kwargs(kv_cache="q8", kv_window=256, ffn_share=0.5, ffn_mode="skip",
                                vocab_on_flash=True, token_filter="auto", filter_keep=64,
                                threads=3, memory_budget="300MB")
    assert (o.kv.kind, o.kv.window, o.kv.sinks) == ("q8", 256, 4)
    assert (o.flash.ffn_share, o.flash.mode) == (0.5, "skip")
    assert o.vocab.on_flash is True
    assert (o.filter.mode, o.filter.keep) == ("auto", 64)
    assert (o.runtime.threads, o.runtime.memory_budget) == (3, "300MB")
    assert o.kv.spec == KVSpec("q8", window=256, sinks=4)


def test_dataclasses_and_keywords_combine_keywords_win():
    o = LoadOptions.from_kwargs(kv=KVOptions(kind="q4", sinks=2), kv_sinks=8,
                                flash=FlashOptions(ffn_share=0.25))
    assert (o.kv.kind, o.kv.sinks, o.flash.ffn_share) == ("q4", 8, 0.25)
    with pytest.raises(InvalidArgumentError, match="KVOptions"):
        LoadOptions.from_kwargs(kv=FlashOptions())


@pytest.mark.parametrize("kw,needle", [
    (dict(kv_cache="q3"), "'q3'"), (dict(backend="tpu"), "'tpu'"),
    (dict(ffn_share=1.5), "1.5"), (dict(ffn_mode="fast"), "'fast'"),
    (dict(head_candidates=0), "head_candidates"), (dict(prefill_chunk=0), "prefill_chunk"),
    (dict(memory_budget="lots"), "'lots'"), (dict(threads=0), "threads"),
    (dict(filter_keep=0), "filter_keep"), (dict(kv_sink=4), "unknown load option 'kv_sink'"),
])
def test_bad_values_are_named(kw, needle):
    with pytest.raises(InvalidArgumentError, match=needle):
        LoadOptions.from_kwargs(**kw)


def test_every_field_has_one_distinct_keyword():
    names = [k for cls in (RuntimeOptions, KVOptions, FlashOptions, FilterOptions)
             for k in kwarg_names(cls)]
    assert len(names) == len(set(names))
    assert "kv_cache" in names and "token_filter" in names and "ffn_mode" in names


def test_cli_defaults_are_the_dataclasses():
    params = {p.name: p for p in app.commands["generate"].params}
    kv, flt, smp = KVOptions(), FilterOptions(), SamplingOptions()
    assert params["kv_cache"].default == kv.kind and params["kv_sinks"].default == kv.sinks
    assert params["filter_keep"].default == flt.keep
    assert params["filter_threshold"].default == flt.threshold
    assert (params["top_k"].default, params["top_p"].default, params["min_p"].default) == \
        (smp.top_k, smp.top_p, smp.min_p)
    assert params["backend"].default == RuntimeOptions().backend
    serve = {p.name: p for p in app.commands["serve"].params}
    assert serve["cache_slots"].default == ServerOptions().cache_slots
    assert serve["max_queue"].default == ServerOptions().max_queue


def _cache(ids, spec: KVSpec | None = None) -> PromptCache:
    caches = make_kv_caches(spec or KVSpec("f16"), 2, 1, 4)
    rng = np.random.default_rng(0)
    for c in caches:
        kv = rng.standard_normal((len(ids), 1, 4)).astype(np.float32)
        for a in range(0, len(ids), 32):  # in chunks, as prefill feeds them
            c.update(kv[a : a + 32], kv[a : a + 32])
    return PromptCache(list(ids), caches, owner=7)


def test_prompt_cache_reuses_its_common_prefix_and_keeps_one_to_run():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0
    c = _cache([5, 6, 7, 8])
    assert c.reuse([5, 6, 9, 9, 9]) == 2
    assert c.ids == [5, 6] and [x.offset for x in c.caches] == [2, 2]
    c = _cache([5, 6, 7])
    assert c.reuse([5, 6, 7]) == 2  # the same prompt: its last token runs again
    row = np.zeros((1, 1, 4), np.float32)
    c.caches[0].update(row, row)  # a pass interrupted after layer 0 took a new position
    c.rollback()
    assert c.ids == [5, 6] and [x.offset for x in c.caches] == [2, 2]
    ids = list(range(300))  # a bounded cache that evicted: its prefix cannot be reused
    c = _cache(ids, KVSpec("f16", window=16, sinks=0))
    assert c.reuse(ids[:100] + [7, 7]) is None
    c = _cache([5, 6, 7, 8])
    c.trim(3)
    assert c.ids == [5] and [x.offset for x in c.caches] == [1, 1]
    assert c.nbytes == sum(x.nbytes for x in c.caches) > 0


def test_stats_dict_keys_and_rates():
    s = GenerationStats("numpy", prompt_tokens=10, prompt_tokens_reused=4, prefill_tokens=6,
                        start=100.0)
    assert "ttft_s" not in s.as_dict()  # before the first token: the call's opening numbers
    s.first_token_at, s.now, s.generated_tokens = 100.5, 102.5, 5
    d = s.as_dict()
    assert d["ttft_s"] == 0.5 and d["prefill_tokens_per_s"] == 12.0
    assert d["tokens_per_s"] == 2.0 and d["elapsed_s"] == 2.5
    assert d["filter_tokens_after"] == 10 and d["token_filter"] is None
    s.filtered = FilterResult(np.arange(3), [1, 2, 3], np.zeros(10, np.float32), 5, 0.1, 64)
    d = s.as_dict()
    assert (d["token_filter"], d["filter_tokens_after"], d["filter_layer"]) == ("gemfilter", 3, 5)
    s.cancelled = True
    assert s.as_dict()["cancelled"] and s.as_dict()["kv_bytes"] == 0


def test_stats_lines_are_readable():
    s = GenerationStats("onnxruntime", prompt_tokens=26, prompt_tokens_reused=20,
                        prefill_tokens=6, generated_tokens=9, start=0.0, first_token_at=0.2,
                        now=1.8, kv_bytes=2_000_000, rss_bytes=300_000_000,
                        peak_rss_bytes=320_000_000)
    lines = stats_lines(s, 100_000_000)
    text = "\n".join(lines)
    assert len(lines) == 4 and "flash" not in text  # no flash line without flash reads
    assert "26 tokens (20 reused), 6 prefilled at 30.0 tokens/s" in lines[0]
    assert "9 tokens at 5.0 tokens/s" in lines[1] and "0.200 s" in lines[2]
    assert "300.0 MB" in lines[3] and "2.0 MB" in lines[3]
    s.flash = {"flash_reads": 12, "flash_bytes_read": 4_000_000, "neuron_cache_hit_rate": 0.9}
    assert stats_lines(s, 1)[-1].startswith("flash:") and "90%" in stats_lines(s, 1)[-1]
    assert stats_lines(None, 0) == ["no reply yet"]


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        KVOptions().kind = "q4"


def test_budget_strings_read_as_the_cli_reads_them():
    """'0.5' is half the file in the API as on the command line; units and plain integers
    are bytes."""
    from flashinfer_lite.memory import parse_budget

    size = 1_117_320_768
    assert parse_budget("0.5", size) == parse_budget(0.5, size) == size // 2
    assert parse_budget("1", size) == size
    assert parse_budget("560MB", size) == 560_000_000
    assert parse_budget("300000000", size) == 300_000_000
