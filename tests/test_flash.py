"""Flash-resident FFN: the converted format, the neuron pool's bookkeeping, the reader, the
sparse kernel, and bad flash directories."""

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import topics_text
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

import flashinfer_lite as fl
from flashinfer_lite.cache.neuron_pool import NeuronPool
from flashinfer_lite.errors import BudgetError, InvalidModelFileError
from flashinfer_lite.evaluation import perplexity
from flashinfer_lite.flash.calibration import RecordingFFN
from flashinfer_lite.flash.convert import convert
from flashinfer_lite.flash.ffn import FlashFFN
from flashinfer_lite.flash.planner import WORKING_BYTES, plan
from flashinfer_lite.kernels import ggml_dot
from flashinfer_lite.kernels.bundle_ffn import (
    DOWN_BLOCK,
    Q8_BYTES,
    Q8_CODES,
    bundle_ffn,
    bundle_ffn_rows,
    dequantize_raw,
    raw_matvec,
)
from flashinfer_lite.kernels.sparse_ffn import sparse_ffn
from flashinfer_lite.loaders.direct_io import ALIGN, FlashReader, coalesce
from flashinfer_lite.loaders.flash_format import DOWN_TYPE, open_flash_dir
from flashinfer_lite.loaders.gguf_file import GGUFFile
from flashinfer_lite.loaders.quant_grid import decode_grid
from flashinfer_lite.registry import resolve_model


@pytest.fixture(scope="module")
def manifest(flash_dir):
    return open_flash_dir(flash_dir)


def read_bundles(man, layer, neurons):
    lay = man.layout
    data = np.fromfile(man.ffn_path, np.uint8, count=lay.section,
                       offset=man.layer(layer)["offset"])
    return data[: lay.ffn_dim * lay.stride].reshape(lay.ffn_dim, lay.stride)[neurons]


def test_bundles_round_trip(manifest, smollm2_path):
    """Up rows are the GGUF's blocks bit-exactly; down columns within Q8_0's error."""
    f = GGUFFile(smollm2_path)
    lay = manifest.layout
    for layer in (0, 17, 29):
        order = np.asarray(manifest.layer(layer)["order"])
        assert sorted(order.tolist()) == list(range(lay.ffn_dim))  # a permutation
        raw = read_bundles(manifest, layer, np.arange(lay.ffn_dim))
        up = np.asarray(f.tensor(f"blk.{layer}.ffn_up.weight").raw)
        np.testing.assert_array_equal(raw[:, : lay.up_bytes], up[order])
        gate = np.fromfile(manifest.gate_path, np.uint8, count=lay.ffn_dim * lay.gate_bytes,
                           offset=manifest.gate_offset(layer)).reshape(lay.ffn_dim, -1)
        np.testing.assert_array_equal(
            gate, np.asarray(f.tensor(f"blk.{layer}.ffn_gate.weight").raw)[order])
        down = f.dense(f"blk.{layer}.ffn_down.weight")  # (d, ffn)
        cols = dequantize(raw[:, lay.up_bytes : lay.up_bytes + lay.down_bytes], DOWN_TYPE)
        ref = down.T[order]
        # Q8_0: error at most half a step of each 32-block's scale (max |x| / 127), plus the
        # scale's own float16 rounding (2^-11 relative, times |q| <= 127: 0.0625 step)
        step = np.abs(ref.reshape(lay.ffn_dim, -1, 32)).max(-1, keepdims=True) / 127
        err = np.abs(cols.reshape(lay.ffn_dim, -1, 32) - ref.reshape(lay.ffn_dim, -1, 32))
        assert (err <= step * 0.57 + 1e-6).all()


def test_calibration_orders_neurons_most_often_active_first():
    """Hand-built layer: gate, up and down are the identity, so neuron i contributes
    silu(h_i) * h_i ~ h_i^2. Each token's top two by contribution count as active: neuron 1
    in 4 tokens, 3 in 3, 2 in 1 (with the largest single contribution), 0 in none. Bundles are
    stored in this order, by how often, not by how much or by id."""
    h = np.array([[10, 40, 20, 30], [12, 35, 15, 38], [11, 33, 14, 31], [10, 39, 100, 13]],
                 np.float32)  # (T, d) = (T, ffn)
    eye = np.eye(4, dtype=np.float32)
    f = SimpleNamespace(dense=lambda name: eye)  # every ffn_gate/up/down weight
    rec = RecordingFFN(f, SimpleNamespace(n_layers=1, ffn_dim=4, activation="silu"))
    np.testing.assert_allclose(rec(0, h), h * h / (1 + np.exp(-h)), rtol=1e-5)  # silu(h) * h
    out = rec.result()
    assert out["order"][0].tolist() == [1, 3, 2, 0]
    # the predicted contribution's weight: mean |up . h| times the down column's norm (1)
    np.testing.assert_allclose(out["weight"][0], h.mean(0), rtol=1e-6)
    assert out["info"]["tokens"] == 4


def test_predicted_neurons_keep_the_contribution_mass(manifest):
    """On SmolLM2's calibration text, the neurons predicted from the resident gate keep most
    of the true contribution mass at 30% skipped, and less the more is skipped."""
    kept = manifest.data["calibration"]["contribution_mass_kept"]
    assert kept["0.3"] > 0.85 and kept["0.1"] > kept["0.3"] > kept["0.5"]


def test_pool_insert_delete_keeps_rows_consistent(manifest):
    lay = manifest.layout
    pool = NeuronPool(lay, 64)
    rng = np.random.default_rng(0)
    raw_all = read_bundles(manifest, 3, np.arange(lay.ffn_dim))
    neurons = rng.choice(lay.ffn_dim, 64, replace=False)
    pool.insert(neurons[:40], raw_all[neurons[:40]], step=0)
    pool.delete(np.array([0, 5, 39, 12]))
    pool.insert(neurons[40:], raw_all[neurons[40:]], step=1)
    assert pool.count == 60
    for s in range(pool.count):  # every live row holds its own neuron's bundle
        n = pool.neuron_of[s]
        assert pool.slot_of[n] == s
        ref = NeuronPool(lay, 1)
        ref.insert(np.array([n]), raw_all[[n]], 0)
        np.testing.assert_array_equal(pool.up_q[s], ref.up_q[0])
        np.testing.assert_array_equal(pool.dn_q[s], ref.dn_q[0])
    assert (pool.slot_of >= 0).sum() == 60 and (pool.neuron_of[60:] == -1).all()
    with pytest.raises(ValueError, match="pool full"):
        pool.insert(neurons[:5], raw_all[neurons[:5]], step=2)


def test_pool_window_protects_recent_neurons(manifest):
    lay = manifest.layout
    pool = NeuronPool(lay, 8)
    raw = read_bundles(manifest, 0, np.arange(16))
    pool.insert(np.arange(8), raw[:8], step=0)
    pool.last_used[pool.slot_of[[6, 7]]] = 10  # used by the current window
    freed = pool.evict_for(4, step=10, window=3)
    assert freed == 4
    assert pool.slot_of[6] >= 0 and pool.slot_of[7] >= 0  # in the window: kept
    assert (pool.slot_of[[2, 3, 4, 5]] < 0).all()  # coldest (largest id) outside the window
    assert (pool.slot_of[[0, 1]] >= 0).all()


def test_sparse_kernel_matches_dense(manifest):
    lay = manifest.layout
    pool = NeuronPool(lay, 200)
    raw = read_bundles(manifest, 5, np.arange(200))
    pool.insert(np.arange(200), raw, 0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, lay.d_model)).astype(np.float32)
    slots = np.stack([np.arange(200), np.r_[np.arange(100), np.zeros(100, int)]])
    counts = np.array([200, 100])
    coef = rng.standard_normal((2, 200)).astype(np.float32)
    got = sparse_ffn(x, pool.block, slots, coef, counts, pool)
    up = decode_grid(lay.up_type, raw[:, : lay.up_bytes], (200, lay.d_model)).dequantize()
    down = dequantize(raw[:, lay.up_bytes : lay.up_bytes + lay.down_bytes], DOWN_TYPE)
    for t in range(2):
        n = counts[t]
        ref = (coef[t, :n] * (up[:n] @ x[t])) @ down[:n]
        np.testing.assert_allclose(got[t], ref, rtol=1e-3, atol=1e-3)


def _activations_as_ggml_has_them(qx: np.ndarray, kern, k: int) -> np.ndarray:
    """x quantized for ggml's vec_dot, decoded by hand from ggml's block layouts (gguf
    decodes only Q8_0): Q8_K = float32 d, int8[256], int16 sums[16]; Q8_1 = float16 d,
    float16 s, int8[32]."""
    if kern.act_type == Q.Q8_0:
        return dequantize(qx, Q.Q8_0).reshape(len(qx), k)
    per, size = kern.act_block, kern.act_block_bytes
    blocks = qx.reshape(len(qx), k // per, size)
    if kern.act_type == Q.Q8_K:
        d = blocks[..., :4].copy().view(np.float32)
        q = blocks[..., 4 : 4 + 256].view(np.int8)
    else:
        d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
        q = blocks[..., 4 : 4 + 32].view(np.int8)
    return (d * q.astype(np.float32)).reshape(len(qx), k)


def _ggml_dot_reference(x: np.ndarray, raw: np.ndarray, qtype, ref: np.ndarray) -> np.ndarray:
    """What ggml's vec_dot computes for rows raw (dequantized: ref) and activations x: the
    dot product with x as quantized for it; for Q4_1 rows, whose minimum multiplies the
    block's sum stored as float16 in Q8_1 (s), with that stored sum."""
    kern = ggml_dot.kernel(qtype)
    k = x.shape[1]
    qx = kern.quantize(x)
    out = _activations_as_ggml_has_them(qx, kern, k) @ ref.T
    if qtype == Q.Q4_1:  # block: float16 d, float16 m, 16 bytes of codes
        m = raw.reshape(len(raw), k // 32, 20)[..., 2:4].copy().view(np.float16)[..., 0]
        blocks = qx.reshape(len(qx), k // 32, kern.act_block_bytes)
        d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        stored = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        sums = blocks[..., 4:36].view(np.int8).astype(np.float32).sum(-1)
        out += (stored - d * sums) @ m.astype(np.float32).T
    return out


@pytest.mark.parametrize("engine", ["numba", "ggml"])
@pytest.mark.parametrize("source", ["smollm2", "qwen-0.5b"])
def test_raw_row_kernels_match_gguf_dequantizer(source, engine, smollm2_path, monkeypatch):
    """The kernels that multiply and decode GGUF rows as they are, on rows of the real models
    (Q4_1; Q5_0, Q8_0, Q4_K), against gguf's dequantizer: decoding bit-exact; products to
    float32 rounding, by our numba decoders over float activations, or by ggml's vec_dot over
    activations quantized as llama.cpp quantizes them (checked against those activations
    decoded)."""
    monkeypatch.setenv("FLASHINFER_LITE_GGML_DOT", "1" if engine == "ggml" else "0")
    ggml_dot.reset()
    if source == "smollm2":
        f, names = GGUFFile(smollm2_path), ["blk.0.ffn_gate.weight"]
    else:
        f = GGUFFile(resolve_model("qwen2.5-coder-0.5b"))
        names = ["blk.0.ffn_gate.weight", "blk.0.attn_v.weight", "blk.11.ffn_down.weight"]
    seen = set()
    try:
        for name in names:
            t = f.tensor(name)
            raw = np.ascontiguousarray(np.asarray(t.raw)[:300])
            ref = dequantize(raw, t.qtype).reshape(len(raw), -1).astype(np.float32)
            k = ref.shape[1]
            np.testing.assert_array_equal(dequantize_raw(raw, t.qtype, k), ref)
            x = np.random.default_rng(0).standard_normal((3, k)).astype(np.float32)
            kern = ggml_dot.kernel(t.qtype)
            assert (kern is not None) == (engine == "ggml")
            want = x @ ref.T if kern is None else _ggml_dot_reference(x, raw, t.qtype, ref)
            if kern is not None:  # quantized, not ignored: 8 bits per activation
                xq = _activations_as_ggml_has_them(kern.quantize(x), kern, k)
                assert 0 < np.abs(xq - x).max() < 0.02 * np.abs(x).max()
            for chunks in (1, 2):
                out = np.full((3, len(raw)), np.nan, np.float32)
                raw_matvec(x, raw, t.qtype, out, chunks)
                np.testing.assert_allclose(out, want, rtol=1e-4,
                                           atol=1e-4 * np.abs(ref).max() * np.sqrt(k))
            seen.add(t.qtype.name)
    finally:
        monkeypatch.delenv("FLASHINFER_LITE_GGML_DOT")
        ggml_dot.reset()
    assert seen == ({"Q4_1"} if source == "smollm2" else {"Q5_0", "Q8_0", "Q4_K"})


@pytest.mark.parametrize("engine", ["numba", "ggml"])
def test_bundle_kernel_matches_dense(manifest, engine, monkeypatch):
    """The raw-bundle FFN kernels (up rows dotted, down columns added where the bundles sit in
    a buffer) against gguf-dequantized weights, per row's own neuron set (bundle_ffn) and over
    the rows' union (bundle_ffn_rows), on one and two threads."""
    monkeypatch.setenv("FLASHINFER_LITE_GGML_DOT", "1" if engine == "ggml" else "0")
    ggml_dot.reset()
    # the down kernel compiles the Q8_0 block's layout in; it must be the table's
    assert (DOWN_BLOCK.nbytes, DOWN_BLOCK.codes) == (Q8_BYTES, Q8_CODES)
    lay = manifest.layout
    raw = read_bundles(manifest, 3, np.arange(300))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, lay.d_model)).astype(np.float32)
    pos = np.stack([np.arange(300), rng.permutation(300)]) * lay.stride
    counts = np.array([300, 120])
    coef = rng.standard_normal((2, 300)).astype(np.float32)
    up = dequantize(raw[:, : lay.up_bytes], lay.up_type).reshape(300, lay.d_model)
    down = dequantize(raw[:, lay.up_bytes : lay.up_bytes + lay.down_bytes], DOWN_TYPE)
    down = down.reshape(300, lay.d_model)
    assert (ggml_dot.kernel(lay.up_type) is not None) == (engine == "ggml")
    ups = (x @ up.T if engine == "numba"
           else _ggml_dot_reference(x, raw[:, : lay.up_bytes], lay.up_type, up))  # (2, 300)
    # the same rows as one verification pass: the union of their bundles, each row's weight
    # (0 where inactive) per bundle
    union = np.zeros((2, 300), np.float32)
    for t in range(2):
        union[t, pos[t, : counts[t]] // lay.stride] = coef[t, : counts[t]]
    try:
        for chunks in (1, 2):
            got = bundle_ffn(x, pos, coef, counts, raw.reshape(-1), lay, chunks)
            got_union = bundle_ffn_rows(x, np.arange(300) * lay.stride, union, raw.reshape(-1),
                                        lay, chunks)
            for t in range(2):
                n = counts[t]
                rows = pos[t, :n] // lay.stride
                ref = (coef[t, :n] * ups[t, rows]) @ down[rows]
                for out in (got, got_union):
                    np.testing.assert_allclose(out[t], ref, rtol=1e-3,
                                               atol=1e-4 * np.abs(ref).max())
    finally:
        monkeypatch.delenv("FLASHINFER_LITE_GGML_DOT")
        ggml_dot.reset()


def test_gate_rows_held_or_read_give_the_same_output(manifest):
    """The gate held whole, held in part, or read whole each call (flash/gate.py): the same
    FFN output, and exactly the rows not held come from flash, one layer ahead."""
    lay = manifest.layout
    h = np.random.default_rng(1).standard_normal((1, lay.d_model)).astype(np.float32)
    outs, read = {}, {}
    for held in (lay.ffn_dim, 1000, 0):
        ffn = FlashFFN(manifest, "silu", capacity=lay.ffn_dim, gate_rows=held, direct=False)
        outs[held] = [ffn(layer, h) for layer in range(manifest.data["n_layers"])]
        read[held] = ffn.report()["gate_bytes_read"]
        ffn.close()
    for held in (1000, 0):
        for a, b in zip(outs[lay.ffn_dim], outs[held], strict=True):
            np.testing.assert_array_equal(a, b)
    n_layers = manifest.data["n_layers"]
    assert read[lay.ffn_dim] == 0
    # all layers, plus layer 0 again: the last layer queues the next token's first
    per_layer = lay.gate_section - (1000 * lay.gate_bytes) // ALIGN * ALIGN
    assert read[1000] == (n_layers + 1) * per_layer
    assert read[0] == (n_layers + 1) * lay.gate_section


def test_planner_gives_the_gate_memory_before_the_pools():
    """Past the minimum pools, the budget holds gate rows first, then grows the pools."""
    mb = 1 << 20
    args = dict(resident_bytes=100 * mb, kv_reserve_bytes=10 * mb, kv_tokens=1024,
                staging_bytes=0, pool_bytes_per_neuron=1000, n_layers=10, ffn_dim=1000,
                gate_row_bytes=500)
    base = 100 * mb + 10 * mb + WORKING_BYTES + 50 * 1000 * 10  # the minimum: 5% pools
    assert plan(base, **args).gate_rows == 0 and plan(base, **args).capacity == 50
    half = plan(base + 500 * 10 * 400, **args)
    assert half.gate_rows == 400 and half.capacity == 50
    full = plan(base + 500 * 10 * 1000 + 1000 * 10 * 100, **args)
    assert full.gate_rows == 1000 and full.capacity == 150
    with pytest.raises(BudgetError, match="minimum is"):
        plan(base - 1, **args)


def test_coalesce_aligns_and_merges():
    reads = coalesce(np.array([100, 5000, 9000, 100000]), np.array([1100, 6000, 9100, 101000]),
                     gap=4096)
    assert all(o % ALIGN == 0 and n % ALIGN == 0 for o, n in reads)
    assert reads == [(0, 12288), (98304, 4096)]


def test_reader_reads_exact_bytes(manifest):
    r = FlashReader(manifest.ffn_path, 3 * ALIGN, threads=2)
    dests = r.read([(0, ALIGN), (8 * ALIGN, 2 * ALIGN)])
    data = manifest.ffn_path.read_bytes()
    np.testing.assert_array_equal(r.staging[dests[1] : dests[1] + 2 * ALIGN],
                                  np.frombuffer(data[8 * ALIGN : 10 * ALIGN], np.uint8))
    assert r.bytes_read == 3 * ALIGN and r.read_calls == 2
    r.close()


@pytest.mark.slow  # its own flash model
def test_flash_model_matches_dense_at_full_share(flash_dir, smollm2):
    """All neurons resident and none skipped: the flash path is the dense model with Q8_0
    down columns; its greedy text and perplexity stay with the dense model's."""
    dense = smollm2
    flash = fl.load(flash_dir, ffn_share=1.0, skip_fraction=0.1, threads=2)
    ids = dense.tokenize(topics_text()[:4000])[:256]
    p_dense, p_flash = perplexity(dense.logits(ids), ids), perplexity(flash.logits(ids), ids)
    assert abs(p_flash / p_dense - 1) < 0.03, (p_dense, p_flash)
    assert flash.generate("The capital of France is", max_tokens=4).strip().startswith("Paris")


@pytest.mark.slow  # two flash models of their own
def test_partial_share_reads_flash_and_stays_close(flash_dir):
    """A quarter of the FFN in DRAM: bundles are read (counted), and perplexity stays close
    (the sets differ: with the whole FFN resident, more neurons pass the resident threshold;
    and ORT's int8 kernels differ by prompt chunk, so 128 positions move ~1-2%)."""
    full = fl.load(flash_dir, ffn_share=1.0, threads=2)
    quarter = fl.load(flash_dir, ffn_share=0.25, threads=2)
    ids = full.tokenize(topics_text()[:4000])[:128]
    p_full, p_q = perplexity(full.logits(ids), ids), perplexity(quarter.logits(ids), ids)
    assert abs(p_q / p_full - 1) < 0.05, (p_full, p_q)
    # the whole FFN resident: every needed neuron is in the pool, nothing is read
    full.generate("The capital of France is", max_tokens=8)
    s = full.stats
    assert s["neuron_cache_hit_rate"] == 1.0 and s["flash_bytes_read"] == s["flash_reads"] == 0
    # a quarter: misses, each read from flash (0.30 of the needed neurons were in the pool)
    quarter.generate("The capital of France is", max_tokens=8)
    s = quarter.stats
    assert s["flash_bytes_read"] > 0 and s["flash_reads"] > 0
    assert 0 < s["neuron_cache_hit_rate"] < 1


def test_budget_too_small_states_minimum(flash_dir):
    with pytest.raises(BudgetError, match="minimum is"):
        fl.load(flash_dir, memory_budget="20MB")


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "missing", "vocab"])
def test_damaged_flash_dir_is_refused(flash_dir, tmp_path, damage):
    bad = tmp_path / "bad.flash"
    shutil.copytree(flash_dir, bad)
    if damage == "truncate":
        with open(bad / "ffn.bin", "r+b") as fh:
            fh.truncate(4096)
    elif damage == "flip":
        data = bytearray((bad / "ffn.bin").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bad / "ffn.bin").write_bytes(bytes(data))
    elif damage == "manifest":
        m = json.loads((bad / "manifest.json").read_text())
        m["layers"][0]["order"][0], m["layers"][0]["order"][1] = 1, 0
        (bad / "manifest.json").write_text(json.dumps(m))
    elif damage == "vocab":
        with open(bad / "vocab.bin", "r+b") as fh:
            fh.seek(1000)
            fh.write(b"\x00" * 8)
    else:
        (bad / "resident.gguf").unlink()
    with pytest.raises(InvalidModelFileError):
        fl.load(bad, ffn_share=0.5)


def test_interrupted_convert_leaves_nothing_loadable(smollm2_path, tmp_path):
    out = tmp_path / "x.flash"

    def boom(f):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(smollm2_path, out, boom)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow  # two flash models of their own
def test_prefetch_reads_ahead_without_changing_results(flash_dir):
    """Layer-ahead reads bring the same bytes: logits agree to float rounding (where a
    bundle sits, pool or read buffer, changes the order of the sums), the prefetch is used
    (counted) and its reads are in the flash byte count."""
    on = fl.load(flash_dir, ffn_share=0.25, prefetch=True, vocab_on_flash=False, threads=2)
    off = fl.load(flash_dir, ffn_share=0.25, prefetch=False, vocab_on_flash=False, threads=2)
    ids = on.tokenize("The history of the city of Rome is long and")
    assert len(ids) <= FlashFFN.PREDICT_ROWS  # one chunk that predicts each next layer
    want = off.logits(ids)
    np.testing.assert_allclose(on.logits(ids), want, rtol=0, atol=1e-3 * np.abs(want).max())
    on.generate("The history of the city of Rome", max_tokens=12)
    s = on.stats
    assert s["prefetch_bytes_read"] > 0 and 0 < s["prefetch_hit_rate"] <= 1
    assert s["flash_bytes_read"] > s["prefetch_bytes_read"]
    off.generate("The history of the city of Rome", max_tokens=12)
    assert off.stats["prefetch_bytes_read"] == 0


def test_conversion_key_follows_content_not_mtime(tmp_path):
    """The flash cache key survives a copy with a new modification time (a reinstalled model
    package) and changes with the content; stale conversions under the old mtime keys of
    the same model are removed, other models' and content-keyed entries are not."""
    import os
    import shutil

    from flashinfer_lite.flash.convert import FINGERPRINT_BYTES, _remove_legacy, fingerprint

    rng = np.random.default_rng(0)
    a = tmp_path / "model.gguf"
    a.write_bytes(rng.integers(0, 256, 3 * FINGERPRINT_BYTES, dtype=np.uint8).tobytes())
    b = tmp_path / "copy" / "model.gguf"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    os.utime(b, ns=(1, 1))
    assert fingerprint(a) == fingerprint(b)
    data = bytearray(b.read_bytes())
    data[-1] ^= 1  # the last byte: the tail is in the key
    b.write_bytes(bytes(data))
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a).startswith(f"{3 * FINGERPRINT_BYTES}-h")

    flash = tmp_path / "flash"
    names = ["model-98362432-1795668471272128218", "model-98362432-1795687043560689960-v2",
             "model-98362432-h0123456789abcdef-v2", "model-98362432-h00112233aabbccdd-v3",
             "other-98362432-1795668471272128218-v2", "model-x-1-v2"]
    for n in names:
        (flash / n).mkdir(parents=True)
    out = flash / "model-98362432-h00112233aabbccdd-v3"
    _remove_legacy(out, "model")
    assert sorted(d.name for d in flash.iterdir()) == sorted(names[2:])


WARM_CHECK = """
import sys, numba
import flashinfer_lite as fl
from flashinfer_lite.kernels import bundle_ffn, ops, sparse_ffn
bundle_ffn.warm()
def sigs():
    return {(m.__name__, k): set(map(str, v.signatures)) for m in (bundle_ffn, ops, sparse_ffn)
            for k, v in vars(m).items() if isinstance(v, numba.core.registry.CPUDispatcher)}
before = sigs()
m = fl.load(sys.argv[1], memory_budget="200MB", threads=2)
prompt = "def add(a, b):\\n    return a + b\\n\\ndef sub(a, b):\\n    return a - b\\n\\ndef mul"
m.generate(prompt, max_tokens=16, temperature=0.0)
new = {k: v - before.get(k, set()) for k, v in sigs().items()}
print({f"{a}.{b}": sorted(v) for (a, b), v in new.items() if v})
"""


def test_kernels_warmed_before_a_budgeted_run(flash_dir):
    """bundle_ffn.warm() compiles (or loads) every kernel signature a budgeted flash run uses
    (gate streamed, prefill and drafted rows): a signature first met mid-run is compiled then,
    and LLVM's ~30 MB of compiler memory lands on top of the budget."""
    proc = subprocess.run([sys.executable, "-c", WARM_CHECK, str(flash_dir)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "{}"
