"""GemFilter: the selection on hand-built scores, the kept structure of a real chat template,
options, a short pass key on Gemma 3, pass-2 positions, chat re-filtering, the CLI flags."""

import json

import numpy as np
import pytest
from conftest import cache_state, run_cli

import flashinfer_lite as fl
from flashinfer_lite.errors import InvalidArgumentError
from flashinfer_lite.filter import FilterOptions, protected_mask, select, smooth

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. "


# ---- selection on hand-built cases------------------------------------------------------------
def test_select_keeps_top_scores_in_order_with_protected():
    scores = np.array([0.1, 5.0, 0.2, 3.0, 0.3, 4.0, 0.0, 0.0])
    protected = np.zeros(8, bool)
    protected[7] = True  # the question: kept although it scores lowest
    assert select(scores, 4, protected).tolist() == [1, 3, 5, 7]
    assert select(scores, 3).tolist() == [1, 3, 5]  # ascending, not by score
    # ties go to the earlier token
    assert select(np.array([1.0, 2.0, 2.0, 2.0, 0.0]), 2).tolist() == [1, 2]
    # a prompt that fits is kept whole; protected tokens beyond `keep` are all kept
    assert select(scores, 8).tolist() == list(range(8))
    assert select(scores, 2, np.ones(8, bool)).tolist() == list(range(8))


def test_smooth_is_a_width_5_average_with_zero_padding():
    x = np.array([0, 0, 5, 0, 0, 0, 0, 10], np.float32)
    # position 0 sees (0, 0 | 0, 0, 5): the padding counts, like avg_pool1d's default
    np.testing.assert_allclose(smooth(x), [1, 1, 1, 1, 1, 2, 2, 2], atol=1e-6)
    # smoothing lifts the neighbours of a high-scoring token above an isolated medium one
    scores = np.array([0, 0, 9, 0, 0, 0, 0, 0, 4, 0, 0], np.float32)
    assert set(select(smooth(scores), 4).tolist()) == {0, 1, 2, 3}


# ---- kept structure on a real chat template ----
def test_protected_keeps_chat_structure_and_final_question(gemma3):
    gf = gemma3.gemfilter
    doc = FILLER * 20
    msgs = [{"role": "user", "content": "Read this.\n" + doc},
            {"role": "assistant", "content": "Done."},
            {"role": "user", "content": "What colour is the sky?"}]
    ids = gemma3.apply_chat_template(msgs)
    mask = gf.protected(ids, keep=256)
    text = [gemma3.tokenizer.token_text(t) for t in ids]
    controls = [i for i, t in enumerate(ids) if gf.is_control[t]]
    assert [text[i] for i in controls].count("<start_of_turn>") == 4  # 3 turns + the reply's
    assert mask[controls].all()
    for i in controls:  # each turn's role line stays with its <start_of_turn>
        if text[i] == "<start_of_turn>":
            assert mask[i + 1] and text[i + 1] in ("user", "model")
    last_user = max(i for i in controls if text[i] == "<start_of_turn>"
                    and text[i + 1] == "user")
    assert mask[last_user:].all()  # the question, whole, and the reply's header
    assert not mask[20:last_user - 10].any()  # the document is left to the scores
    # a final turn longer than keep/4 keeps only its last line (the question) whole
    msgs = [{"role": "user", "content": doc + "\nWhat colour is the sky?"}]
    ids = gemma3.apply_chat_template(msgs)
    mask = gf.protected(ids, keep=128)
    kept_text = gemma3.detokenize([t for t, k in zip(ids, mask, strict=True) if k])
    assert "What colour is the sky?" in kept_text
    assert mask.sum() < 32


def test_protected_raw_prompt_keeps_last_line():
    ids = list(range(10, 30))
    texts = {t: "w" for t in ids}
    texts[24] = "\n"
    is_control = np.zeros(64, bool)
    mask = protected_mask(ids, is_control, texts.__getitem__, tail_cap=8)
    assert np.flatnonzero(mask).tolist() == list(range(15, 20))  # after the last newline
    mask = protected_mask(ids, is_control, texts.__getitem__, tail_cap=3)
    assert np.flatnonzero(mask).tolist() == [17, 18, 19]  # capped


# ---- the filter layer ----
@pytest.mark.parametrize("model,layers", [("qwen2.5-coder-0.5b", 24), ("qwen2.5-coder-1.5b", 28)])
def test_default_filter_layer_comes_from_the_measurement(smollm2, model, layers):
    import dataclasses
    from pathlib import Path

    from flashinfer_lite.filter import default_filter_layer
    from flashinfer_lite.filter.gemfilter import MEASURED_FILTER_LAYERS

    cfg = smollm2.config
    assert default_filter_layer(cfg) == 12  # 40% of 30 layers: not measured
    qwen = dataclasses.replace(cfg, architecture="qwen2", n_layers=layers)
    layer = default_filter_layer(qwen)
    assert layer == MEASURED_FILTER_LAYERS[("qwen2", layers)]
    # the committed run: the earliest layer that, with the next, kept the whole key in every
    # prompt
    path = Path(__file__).parents[1] / f"benchmarks/results/gemfilter_{model}.json"
    rows = [r for acc in json.loads(path.read_text())["accuracy"].values() for r in acc["rows"]]
    recall = np.array([r["recall"]["1024"] for r in rows])  # (prompts, layers)
    assert len(rows) == 5 and recall.shape[1] == layers
    whole = (recall == 1).all(axis=0)  # (layers,)
    assert layer == next(r for r in range(layers - 1) if whole[r] and whole[r + 1])


# ---- options ----
@pytest.mark.parametrize("kw", [dict(mode="magic"), dict(mode="gemfilter", keep=0),
                                dict(mode="auto", keep=True), dict(mode="auto", threshold=-1),
                                dict(mode="gemfilter", layer=-1), dict(keep=1.5)])
def test_filter_options_validation(kw):
    with pytest.raises(InvalidArgumentError):
        FilterOptions(**kw)


def test_filter_options_when_they_apply():
    assert not FilterOptions(None).applies(10**5)
    assert FilterOptions("gemfilter", keep=100).applies(101)
    assert not FilterOptions("gemfilter", keep=100).applies(100)
    auto = FilterOptions("auto", keep=100, threshold=500)
    assert not auto.applies(499) and auto.applies(500)


def test_bad_filter_options_through_the_api(smollm2_path, smollm2):
    with pytest.raises(InvalidArgumentError, match="filter_layer"):
        fl.load(smollm2_path, token_filter="gemfilter", filter_layer=99)
    with pytest.raises(InvalidArgumentError, match="filter_keep"):
        smollm2.generate("Hi", max_tokens=1, token_filter="gemfilter", filter_keep=0)
    with pytest.raises(InvalidArgumentError, match="filter_kep"):
        smollm2.generate("Hi", max_tokens=1, filter_kep=3)


# ---- behaviour on real models ----
def test_short_prompt_identical_to_no_filter(smollm2):
    prompt = "The capital of France is"
    plain = smollm2.generate(prompt, max_tokens=12)
    for kw in (dict(token_filter="auto"), dict(token_filter="gemfilter")):
        assert smollm2.generate(prompt, max_tokens=12, **kw) == plain
        assert smollm2.stats["token_filter"] is None
        assert smollm2.stats["filter_tokens_after"] == smollm2.stats["prompt_tokens"]


def test_pass1_scores_do_not_depend_on_chunking(smollm2, smollm2_path):
    ids = smollm2.tokenize(FILLER * 8 + "The secret is 4312. What is the secret?")
    whole = smollm2.gemfilter.scores(ids, 6)
    chunked = fl.load(smollm2_path, prefill_chunk=37, threads=2).gemfilter.scores(ids, 6)
    # ONNX Runtime's kernels round differently for other row counts: a few % of the range
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=0.05 * np.abs(whole).max())
    assert len(set(select(smooth(chunked), 24)) & set(select(smooth(whole), 24))) >= 21


def test_gemma_pass_key_kept_and_pass2_from_position_0(gemma3):
    m = gemma3
    key = 73914
    text = ("There is a pass key hidden inside a lot of irrelevant text. Find it.\n"
            + FILLER * 20 + f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
            + FILLER * 20 + "\nWhat is the pass key? The pass key is")
    ids = m.tokenize(text)
    assert len(ids) > 700
    out = m.generate(ids, max_tokens=8, token_filter="gemfilter", filter_keep=192)
    s = m.stats
    assert str(key) in out.replace(" ", ""), out
    assert (s["token_filter"], s["filter_tokens_before"], s["filter_tokens_after"]) == \
        ("gemfilter", len(ids), 192)
    assert s["filter_layer"] == 5 and s["filter_pass1_s"] > 0 and s["filter_pass2_s"] > 0
    assert s["filter_pass1_bytes"] >= len(ids) * 256 * 2  # layer 5's float16 keys (1 KV head)
    kept = m.filter_prompt(ids, keep=192).kept_ids
    digits = m.tokenize(str(key), add_bos=False)
    assert all(d in kept for d in digits)
    # pass 2 ran the kept tokens alone, from position 0: the cache holds exactly them (+ the
    # generated tokens but the last), and generating from them unfiltered gives the same text
    state = cache_state(m)
    assert state.ids[:192] == kept
    assert state.caches[0].offset == 192 + s["generated_tokens"] - 1
    assert m.generate(kept, max_tokens=8) == out


def test_chat_refilters_the_raw_history(smollm2):
    m = smollm2
    doc = FILLER * 8 + "The secret word is banana. " + FILLER * 8
    msgs = [{"role": "system", "content": "Reference:\n" + doc},
            {"role": "user", "content": "What is the secret word?"}]
    opts = dict(token_filter="gemfilter", filter_keep=96, filter_layer=4, max_tokens=6)
    reply = m.chat(msgs, **opts)
    assert m.stats["filter_tokens_before"] == len(m.apply_chat_template(msgs))
    msgs += [{"role": "assistant", "content": reply},
             {"role": "user", "content": "And what colour is the sky?"}]
    m.chat(msgs, **opts)
    raw = m.apply_chat_template(msgs)
    s = m.stats
    assert s["filter_tokens_before"] == len(raw)  # the whole raw history, not the kept one
    after = s["filter_tokens_after"]
    assert after == 96
    assert cache_state(m).ids[:after] == m.filter_prompt(raw, keep=96, layer=4).kept_ids


@pytest.mark.slow
def test_cli_filter_flags(smollm2_path):
    prompt = FILLER * 6 + "\nWhat colour is the grass?"
    proc = run_cli("generate", "--raw", "-m", str(smollm2_path), "-p", prompt, "-n", "4",
                   "--json", "--token-filter", "gemfilter", "--filter-keep", "32",
                   "--filter-layer", "6")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)["stats"]
    assert (stats["filter_tokens_after"], stats["filter_layer"]) == (32, 6)
    proc = run_cli("generate", "-p", "Hi", "--token-filter", "magic")
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "magic" in lines[0]


def test_rope_rows_come_from_one_shared_block_per_configuration(gemma3_path, monkeypatch):
    """Long prompts must not grow a RoPE table per layer (590 MB at 32k on Gemma 3): a model
    makes one table per configuration, whose rows equal computing them directly."""
    from flashinfer_lite.kernels.ops import rope_tables
    from flashinfer_lite.models.common import RopeTable

    made = []
    init = RopeTable.__init__
    monkeypatch.setattr(RopeTable, "__init__",
                        lambda self, *a, **kw: made.append(a[1:3]) or init(self, *a, **kw))
    fl.load(gemma3_path, threads=2).close()
    monkeypatch.undo()
    assert sorted(made) == [(10_000.0, 1.0), (1e6, 1.0)]  # local and global (base, scale)
    table = RopeTable(256, 1e6, 1.0, None)
    for positions in (np.arange(0, 256), np.arange(1000, 1300), np.array([40000]),
                      np.arange(5, 9), np.arange(3000, 3000 + 2500)):
        cos, sin = table.rows(positions)
        ref_cos, ref_sin = rope_tables(positions, 256, 1e6)
        np.testing.assert_array_equal(cos, ref_cos)
        np.testing.assert_array_equal(sin, ref_sin)
        assert len(table.cos) <= max(RopeTable.STEP, len(positions))


@pytest.mark.slow
def test_mlx_selects_the_same_tokens_as_onnxruntime(gemma3_path):
    """Pass 1 on MLX (its CPU device here: slow, so a short prompt) keeps the tokens that the
    ONNX Runtime path keeps, up to near ties at the cut (the backends round differently)."""
    pytest.importorskip("mlx.core", reason="MLX is not installed (the [mlx]/[cuda] extras)")
    key, keep, chunk = 58203, 64, 64
    text = ("There is a pass key hidden inside a lot of irrelevant text. Find it.\n"
            + FILLER * 6 + f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
            + FILLER * 6 + "\nWhat is the pass key? The pass key is")
    m = fl.load(gemma3_path, backend="mlx", prefill_chunk=chunk)
    ids = m.tokenize(text)
    assert len(ids) > 3 * keep
    got = m.filter_prompt(ids, keep=keep)
    assert type(cache_state(m).caches[0]).__name__ == "MlxKVCache"  # the device path
    ort = fl.load(gemma3_path, prefill_chunk=chunk, threads=2)  # the same chunking
    ref = ort.filter_prompt(ids, keep=keep)
    assert got.layer == ref.layer == 5
    scale = np.abs(ref.scores).max()
    # the two paths round differently (measured: within 1.9% of the largest score)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=0, atol=0.03 * scale)
    digits = m.tokenize(str(key), add_bos=False)
    first = next(i for i in range(len(ids)) if ids[i : i + len(digits)] == digits)
    needle = set(range(first, first + len(digits)))  # the key's first occurrence
    assert needle <= set(got.kept) and needle <= set(ref.kept)
    cut = np.sort(ref.scores)[::-1][keep - 1]  # roughly the k-th score (protected tokens aside)
    differ = sorted(set(got.kept) ^ set(ref.kept))
    assert all(abs(ref.scores[i] - cut) < 0.02 * scale for i in differ), differ
    assert len(differ) <= 4
