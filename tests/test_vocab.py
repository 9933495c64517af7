"""The vocabulary on flash: the low-bit preview's encoding, rows read on demand, the two-stage
head against the exact head, and the planner's choice."""

import numpy as np
import pytest
from conftest import topics_text
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

import flashinfer_lite as fl
from flashinfer_lite.kernels.numpy_backend import NumpyBackend
from flashinfer_lite.kernels.onnxruntime_backend import OnnxRuntimeBackend
from flashinfer_lite.loaders.flash_format import open_flash_dir
from flashinfer_lite.vocab.head import TwoStageHead
from flashinfer_lite.vocab.preview import pack, quantize, unpack
from flashinfer_lite.vocab.rows import VocabRows


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip(bits):
    v = np.random.default_rng(bits).integers(0, 1 << bits, (3, 5, 64), dtype=np.uint8)
    assert np.array_equal(unpack(pack(v, bits), bits), v)


@pytest.mark.parametrize("bits,block", [(2, 32), (4, 64), (8, 32)])
def test_quantize_error_within_one_step_per_group(bits, block):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((50, 256)).astype(np.float32) * rng.uniform(0.1, 3, (50, 1))
    g = quantize(w, bits, block)
    err = np.abs(g.dequantize() - w).reshape(50, -1, block).max(axis=2)  # (rows, groups)
    # the grid spans [min, max] with 0 on it: rounding costs at most half a step, snapping
    # the zero point at most another half
    assert (err <= g.scale * 1.0001).all()
    if bits == 8:
        assert (err <= g.scale * 0.5001 + np.abs(w).max() / 255).all()


def test_packed_matmul_ort_matches_numpy():
    rng = np.random.default_rng(1)
    g = quantize(rng.standard_normal((700, 640)).astype(np.float32), 4, 64)
    x = rng.standard_normal((3, 640)).astype(np.float32)
    ref = NumpyBackend().compile(None, lambda b, h: [b.linear_packed(h, g)], [640])(x)[0]
    assert np.allclose(ref, x @ g.dequantize().T, atol=1e-3)
    ort = OnnxRuntimeBackend(2).compile(None, lambda b, h: [b.linear_packed(h, g)], [640])(x)[0]
    # ORT quantizes activations to int8 per block: ~1% of the largest output
    assert np.abs(ort - ref).max() < 0.02 * np.abs(ref).max()


@pytest.fixture(scope="module")
def manifest(flash_dir):
    return open_flash_dir(flash_dir)


def vocab_rows(manifest, hot_rows, cache_rows):
    """The flash directory's vocabulary rows, read on demand."""
    return VocabRows(manifest.path / "vocab.bin", manifest.token_order(),
                     GGMLQuantizationType[manifest.vocab["qtype"]], manifest.layout.d_model,
                     hot_rows=hot_rows, cache_rows=cache_rows)


def test_rows_hot_pooled_and_read_are_exact(manifest, smollm2_file):
    rows = vocab_rows(manifest, hot_rows=100, cache_rows=8)
    raw = np.asarray(smollm2_file.tensor("token_embd.weight").raw)
    order = manifest.token_order()
    hot, cold = order[:5], order[[5000, 7, 40000, 123, 30000]]
    ids = np.concatenate([hot, cold, cold[:2]])  # cold[:2] twice in one call
    got = rows.raw(ids)
    assert np.array_equal(got, raw[ids])
    assert rows.reader.bytes_read > 100 * rows.row_bytes  # the hot rows, then 5 cold ones
    assert np.allclose(rows.rows(ids), dequantize(raw[ids], GGMLQuantizationType.Q8_0))
    n_reads = rows.reader.read_calls
    rows.raw(cold)  # all pooled now
    assert rows.reader.read_calls == n_reads
    rows.raw(order[1000:1008])  # 8 new rows evict the 5 pooled ones (LRU, capacity 8)
    rows.raw(cold[:1])
    assert rows.reader.read_calls > n_reads + 1
    rows.close()


def test_two_stage_head_is_exact_on_candidates(manifest, smollm2, smollm2_file):
    """The flash directory's preview head picks 64 candidates per position, whose logits are
    exact; the rest stay below them. Hidden states: the dense model's, on real text."""
    preview = manifest.preview().dequantize()  # (V, d), token id order
    rows = vocab_rows(manifest, hot_rows=1024, cache_rows=4096)
    head = TwoStageHead(lambda h: h @ preview.T, rows, 64)
    ids = smollm2.tokenize(topics_text()[:2000])[:96]
    h = smollm2.hidden_states(ids)
    full = h @ smollm2_file.dense("token_embd.weight").T  # the exact head
    two = head(h)
    for t in range(len(h)):
        cand = head.candidates(h[t] @ preview.T)
        assert np.allclose(two[t, cand], full[t, cand], atol=1e-3)
        assert two[t].max() == two[t, cand].max()  # the capped tail never wins
    assert (two.argmax(1) == full.argmax(1)).mean() >= 0.98
    # the streamed whole head (what Model.logits uses): exact everywhere
    assert np.allclose(head.full(h), full, atol=2e-3)
    rows.close()


@pytest.fixture(scope="module")
def two_models(flash_dir):
    """The same flash model (whole FFN resident, nothing skipped) with the resident head and
    with the vocabulary on flash."""
    kw = dict(ffn_share=1.0, skip_fraction=0.0, threads=2)
    return (fl.load(flash_dir, vocab_on_flash=False, **kw),
            fl.load(flash_dir, vocab_on_flash=True, **kw))


@pytest.mark.slow  # two flash models of their own
def test_vocab_on_flash_generates_exact_head_greedy(two_models, smollm2_file):
    """Greedy decoding with the two-stage head picks the exact head's best token at every step
    (a near tie may flip: decode-path and prompt-path kernels differ by ~0.1 in ORT)."""
    resident, flash = two_models
    prompt = flash.tokenize("The history of the Python programming language")
    out = list(flash.stream(prompt, max_tokens=24, temperature=0))
    gen = [c.token for c in out if c.token is not None]
    h = flash.hidden_states(prompt + gen)[len(prompt) - 1 : -1]  # the state before each token
    exact = h @ smollm2_file.dense("token_embd.weight").T
    best = exact.max(1)
    chosen = exact[np.arange(len(gen)), gen]
    assert (best - chosen < 0.15).all(), best - chosen
    s = flash.stats
    # some candidates were hot or pooled rows, some were read from flash
    assert s["vocab_bytes_read"] > 0 and 0 < s["vocab_rows_cache_hit_rate"] < 1
    assert 0 < s["head_time_share"] < 1
    assert flash.resident_bytes < resident.resident_bytes  # preview instead of the Q8_0 head


def test_planner_puts_vocabulary_on_flash_only_when_needed(flash_dir):
    """160 MB only fits with the vocabulary on flash (planning.vocab_needs_flash: the head
    stays if it fits beside a quarter of the FFN), 200 MB fits the resident head; both stay
    within the budget; 100 MB is below the floor (~149 MB)."""
    tight = fl.load(flash_dir, memory_budget="160MB", threads=2)
    assert tight.vocab_bytes > 0  # the preview head and row pools
    # what the model holds leaves the KV cache the plan reserved (so a context of
    # kv_reserve_tokens is admitted)
    for m in (tight, roomy := fl.load(flash_dir, memory_budget="200MB", threads=2)):
        assert m.held_bytes + m.plan.kv_reserve_bytes <= m.memory_budget
    assert roomy.vocab_bytes == 0
    with pytest.raises(fl.BudgetError, match="minimum is"):
        fl.load(flash_dir, memory_budget="100MB", threads=2)
