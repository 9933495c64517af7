"""The MLX backend against the numpy reference. In CI this runs on MLX's CPU device (Linux:
`mlx-cpu`), which is slow (the slow tier), so the model checks use a few dozen tokens; the
512-position GPU comparison is benchmarks/bench_mlx.py's."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

mx = pytest.importorskip("mlx.core", reason="MLX is not installed (the [mlx]/[cuda] extras)")
pytestmark = pytest.mark.slow

from conftest import cache_state, topics_text  # noqa: E402

import flashinfer_lite as fl  # noqa: E402
from flashinfer_lite.kernels import ggml_dot  # noqa: E402
from flashinfer_lite.kernels.mlx_backend import mlx_gpu_available  # noqa: E402
from flashinfer_lite.kernels.mlx_weights import (  # noqa: E402
    GROUP,
    grid_to_mlx,
    to_mlx_weight,
)
from flashinfer_lite.loaders.quant_grid import decode_grid  # noqa: E402


def _ids(m, n):
    return m.tokenize(topics_text()[: 8 * n])[:n]


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0])
def test_gguf_blocks_map_to_mlx_groups_exactly(qtype):
    rng = np.random.default_rng(int(qtype))
    w = rng.standard_normal((48, 256)).astype(np.float32)
    raw = quantize(w, qtype)
    ref = dequantize(raw, qtype).reshape(w.shape)
    m = grid_to_mlx(decode_grid(qtype, raw, w.shape), qtype)
    assert m.bits == {Q.Q5_0: 5, Q.Q5_1: 5, Q.Q8_0: 8}.get(qtype, 4)
    np.testing.assert_allclose(m.dequantize(), ref, rtol=1e-6, atol=1e-6)
    # MLX itself reads the packing the same way
    got = mx.dequantize(mx.array(m.packed), mx.array(m.scales), mx.array(m.biases),
                        group_size=GROUP, bits=m.bits)
    np.testing.assert_allclose(np.array(got), ref, rtol=1e-6, atol=1e-6)


def test_k_quants_of_a_real_file(gemma3_file):
    """Q4_K maps exactly; Q6_K (16-element scales) is requantized to 8 bits, close."""
    f = gemma3_file
    types = {}
    for name in f.tensors:
        t = f.tensor(name)
        if len(t.shape) == 2 and t.qtype in (Q.Q4_K, Q.Q6_K):
            types.setdefault(t.qtype, name)
    assert set(types) == {Q.Q4_K, Q.Q6_K}
    for qtype, name in types.items():
        ref = f.dense(name)[:64]
        got = to_mlx_weight(f, name, rows=(0, 64)).dequantize()
        err = np.abs(got - ref).max() / np.abs(ref).max()
        if qtype == Q.Q4_K:
            assert err < 1e-6
        else:
            assert 0 < err < 1e-2


# Both backends prefill in chunks of 4: several chunks in a few dozen tokens.
@pytest.fixture(scope="module")
def numpy_chunk4(smollm2_path):
    return fl.load(smollm2_path, backend="numpy", prefill_chunk=4)


@pytest.fixture(scope="module")
def mlx_chunk4(smollm2_path):
    return fl.load(smollm2_path, backend="mlx", prefill_chunk=4)


def test_logits_match_numpy_through_chunked_prefill(numpy_chunk4, mlx_chunk4):
    ids = _ids(numpy_chunk4, 7)  # 2 chunks: the device cache and causal masks across chunks
    ref, got = numpy_chunk4.logits(ids), mlx_chunk4.logits(ids)
    assert type(cache_state(mlx_chunk4).caches[0]).__name__ == "MlxKVCache"
    assert np.abs(got - ref).max() < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_decode_matches_numpy(numpy_chunk4, mlx_chunk4, tmp_path):
    prompt = "The Python language"
    a = numpy_chunk4.generate(prompt, max_tokens=3)
    b = mlx_chunk4.generate(prompt, max_tokens=3)
    assert a == b and len(a) > 0
    # a second call reuses the device cache's prefix (trim) and must give the same text
    assert mlx_chunk4.generate(prompt, max_tokens=3) == b
    # the device cache round-trips through a prompt-cache file
    path = tmp_path / "prompt.flkv"
    mlx_chunk4.save_cache(path)
    held = cache_state(mlx_chunk4).caches[0].offset
    mlx_chunk4.reset()
    assert mlx_chunk4.load_cache(path) == held == cache_state(mlx_chunk4).caches[0].offset
    assert mlx_chunk4.generate(prompt, max_tokens=3) == b
    assert mlx_chunk4.stats["prompt_tokens_reused"] > 0


def test_quantized_kv_cache_stays_on_host(smollm2_path, numpy_chunk4):
    """q8 is a host cache: the MLX model then runs the shared numpy attention core. Six positions
    stay in q8's float16 residual, so the numpy f16 logits are the reference."""
    m = fl.load(smollm2_path, backend="mlx", kv_cache="q8", prefill_chunk=4)
    ids = _ids(numpy_chunk4, 6)
    got = m.logits(ids)
    assert type(cache_state(m).caches[0]).__name__ == "QuantizedKVCache"
    assert np.abs(got - numpy_chunk4.logits(ids)).max() < 0.05


@pytest.mark.parametrize("layer", [0, 5])  # a sliding-window layer, a global one
def test_gemma3_attention_core_on_the_device(gemma3_file, layer):
    """Gemma 3's core (q/k norms, neox RoPE with two bases, sliding window shrunk to 6) on the
    device cache against the numpy core, through prefill chunks and single decode steps, past
    the point where the sliding layer's device cache drops its oldest positions, then through
    a small trim (exact) and a trim into dropped positions (both caches start over)."""
    from flashinfer_lite.cache.kv import EVICT_STEP, WINDOW_SLACK, KVSpec, make_kv_cache
    from flashinfer_lite.config import ModelConfig
    from flashinfer_lite.kernels.mlx_attention import MlxAttentionCore, MlxKVCache
    from flashinfer_lite.kernels.mlx_backend import MlxBackend
    from flashinfer_lite.kernels.numpy_backend import NumpyBackend
    from flashinfer_lite.models.common import AttentionCore

    f = gemma3_file
    cfg = ModelConfig.from_gguf(f)
    assert cfg.is_sliding(layer) == (layer == 0)
    ref_core = AttentionCore(f, cfg, layer, NumpyBackend())
    core = MlxAttentionCore(f, cfg, layer, MlxBackend())
    window = 6 if ref_core.window is not None else None
    ref_core.window = core.window = window
    ref_cache = make_kv_cache(KVSpec("f16"), cfg.n_kv_heads, cfg.head_dim, sliding_window=window)
    cache = MlxKVCache(cfg.n_kv_heads, cfg.head_dim, mx, window=window)
    rng = np.random.default_rng(layer)

    def step(t):
        q, k, v = (rng.standard_normal((t, n * cfg.head_dim)).astype(np.float32)
                   for n in (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads))
        pos = np.arange(cache.offset, cache.offset + t)
        ref = ref_core(q, k, v, ref_cache, pos)
        got = np.array(core(mx.array(q), mx.array(k), mx.array(v), cache, pos))
        np.testing.assert_allclose(got, ref, atol=2e-2, rtol=0)
        assert cache.offset == ref_cache.offset == pos[-1] + 1

    for t in (4, 4, 1, 3, 1, 1, 100, 100, 1, 60, 1):
        step(t)
    if window is None:
        assert cache.first_position == 0 and cache.held == cache.offset == 276
    else:  # 276 positions: one step of EVICT_STEP dropped, at most keep + a step + a chunk held
        assert cache.first_position == EVICT_STEP
        assert cache.held <= window - 1 + WINDOW_SLACK + EVICT_STEP
        assert cache.bytes_at(10_000, 100) == cache.bytes_at(20_000, 100)
    assert cache.trim(2) == ref_cache.trim(2) == 2
    step(1)
    if window is not None:  # back past the window's first held position: start over
        assert cache.trim(200) == ref_cache.trim(200) == 275  # everything dropped
        assert cache.offset == ref_cache.offset == 0 and cache.nbytes == 0
        step(3)


def test_flash_ffn_on_the_device_matches_the_cpu_one(smollm2_path, numpy_chunk4, monkeypatch):
    ids = _ids(numpy_chunk4, 5)
    # the host's FFN dot products (the gate on both, the bundles on the CPU) over float
    # activations, as the device computes its own: llama.cpp's 8-bit activations
    # (kernels/ggml_dot.py) move SmolLM2's logits by ~0.2
    monkeypatch.setenv("FLASHINFER_LITE_GGML_DOT", "0")
    ggml_dot.reset()
    try:
        ref = fl.load(smollm2_path, backend="numpy", ffn_share=0.5, prefill_chunk=2).logits(ids)
        gpu = fl.load(smollm2_path, backend="mlx", ffn_share=0.5, prefill_chunk=2)
        got = gpu.logits(ids)
    finally:
        monkeypatch.delenv("FLASHINFER_LITE_GGML_DOT")
        ggml_dot.reset()
    # the skip rule may flip a neuron at its threshold between backends: compare predictions
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 4 / 5
    assert np.median(np.abs(got - ref)) < 0.1
    r = gpu.flash_report()
    # the device's neuron pool (MlxFlashFFN) copied in bundles read from flash
    assert r["h2d_bytes"] > 0 and r["flash_bytes_read"] >= r["h2d_bytes"] * 0.5


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0])
def test_device_bundle_decoder(qtype):
    from flashinfer_lite.flash.mlx_ffn import decode_rows

    w = np.random.default_rng(3).standard_normal((5, 128)).astype(np.float32)
    raw = quantize(w, qtype)
    got = np.array(decode_rows(mx, mx.array(raw), qtype, 128))
    np.testing.assert_array_equal(got, dequantize(raw, qtype).reshape(5, 128))


def test_preview_head_grid_on_mlx(smollm2_file):
    """The vocabulary-on-flash preview head (2-bit MatMulNBits layout) as MLX groups."""
    from flashinfer_lite.kernels.mlx_backend import MlxBackend
    from flashinfer_lite.vocab.preview import quantize as preview_quantize

    w = np.random.default_rng(5).standard_normal((96, 576)).astype(np.float32)
    grid = preview_quantize(w, 2, 64)
    x = np.random.default_rng(6).standard_normal((3, 576)).astype(np.float32)
    seg = MlxBackend().compile(smollm2_file, lambda g, h: [g.linear_packed(h, grid)], [576])
    got = np.array(seg(mx.array(x))[0])
    np.testing.assert_allclose(got, x @ grid.dequantize().T, rtol=1e-4, atol=1e-3)


def test_auto_picks_mlx_only_with_a_gpu(smollm2):
    # the shared model is loaded with the default backend, "auto"
    assert smollm2.backend.name == ("mlx" if mlx_gpu_available() else "onnxruntime")


def test_windowed_device_cache_state_round_trip():
    """A sliding-window device cache that has dropped positions saves and restores exactly:
    the same held keys and values, the same first position and offset (prompt-cache files)."""
    from flashinfer_lite.kernels.mlx_attention import MlxKVCache

    rng = np.random.default_rng(3)
    cache = MlxKVCache(2, 8, mx, window=6)
    for t in (100, 100, 100, 7):
        k, v = (mx.array(rng.standard_normal((1, 2, t, 8)).astype(np.float32)) for _ in range(2))
        cache.update(k, v)
    assert cache.offset == 307 and cache.first_position > 0
    state = cache.state
    back = MlxKVCache(2, 8, mx, window=6)
    back.state = state
    assert (back.offset, back.first_position) == (cache.offset, cache.first_position)
    for a, b in zip(back.fetch(), cache.fetch(), strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_pipelined_greedy_decode(smollm2_path, numpy_chunk4, mlx_chunk4):
    """Greedy decoding with drafts off runs through the device pipeline (kernels/mlx_decode.py):
    the same tokens as the numpy reference, the cache left holding what the host-sampled path
    leaves (the prompt and every token but the last), and the context's end in the same place."""
    prompt = "The Python language"
    kw = dict(max_tokens=10, num_draft_tokens=0)
    ref = [c.token for c in numpy_chunk4.stream(prompt, **kw)]
    pipe = mlx_chunk4.net.backend.greedy_pipeline(mlx_chunk4.net,
                                                 cache_state(mlx_chunk4).caches)
    pipe.reset_counters()
    got = [c.token for c in mlx_chunk4.stream(prompt, **kw)]
    assert got == ref and len(got) == 10
    assert pipe.steps == 10 and pipe.host_s > 0
    n_prompt = len(mlx_chunk4.tokenize(prompt))
    state = cache_state(mlx_chunk4)
    assert len(state.ids) == state.caches[0].offset == n_prompt + 9
    # near the context's end the pipeline queues no step past it
    small = {"ctx_size": n_prompt + 6, "prefill_chunk": 4}
    a = list(fl.load(smollm2_path, backend="numpy", **small).stream(prompt, max_tokens=50,
                                                                    num_draft_tokens=0))
    b = list(fl.load(smollm2_path, backend="mlx", **small).stream(prompt, max_tokens=50,
                                                                  num_draft_tokens=0))
    assert [c.token for c in b] == [c.token for c in a] and len(b) < 50
    assert b[-1].finish_reason == a[-1].finish_reason == "length"


def test_qwen_on_mlx_matches_onnxruntime():
    """Qwen2.5-Coder 0.5B (qwen2: q/k/v biases, no BOS, Q5_0/Q8_0/Q4_K/Q6_K tensors, an untied
    Q8_0 head) on MLX against ONNX Runtime (int8 activations, so not equal), and position 0,
    where Qwen's residual stream is at its most extreme, against a float64 forward."""
    from flashinfer_lite.evaluation import compare_logits
    from flashinfer_lite.reference import first_position_logits

    ort = fl.load("qwen2.5-coder-0.5b", backend="onnxruntime", threads=2)
    m = fl.load("qwen2.5-coder-0.5b", backend="mlx")
    assert m.config.architecture == "qwen2"
    ids = ort.tokenize(topics_text()[:400])[:40]
    got, ref = m.logits(ids), ort.logits(ids)
    r = compare_logits(got, ref, ids)
    assert abs(r.ppl_ratio - 1) < 0.02, r
    assert r.top1_agreement >= 0.9 and r.max_reference_margin < 0.5, r
    assert r.max_abs_logit_diff < 1.5, r
    first = first_position_logits(m.path, ids[0])
    assert int(got[0].argmax()) == int(first.argmax())
    assert np.abs(got[0] - first).max() < 1.0, np.abs(got[0] - first).max()
