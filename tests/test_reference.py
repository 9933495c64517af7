"""Both real models against llama.cpp on real text (pydoc topics), and greedy continuations
(the slow tier); ONNX Runtime's weight layout against the float32 reference."""

import numpy as np
import pytest
from conftest import llama_cpp_logits, topics_text

from flashinfer_lite.evaluation import compare_logits
from flashinfer_lite.kernels.numpy_backend import NumpyBackend
from flashinfer_lite.kernels.onnxruntime_backend import OnnxRuntimeBackend

POSITIONS = 1024
PROMPTS = [
    "The Python interpreter reads a source file and",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
]


def text_ids(m, n):
    """BOS + the first n - 1 tokens of the pydoc topics."""
    return [m.tokenizer.bos_id] + m.tokenize(topics_text()[: 8 * n], add_bos=False)[: n - 1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_logits_match_llama_cpp(name, request):
    m = request.getfixturevalue(name)
    ids = text_ids(m, POSITIONS)
    ours = m.logits(ids)
    ref = llama_cpp_logits(m.path, ids)
    assert ours.shape == ref.shape == (POSITIONS, m.config.vocab_size)
    r = compare_logits(ours, ref, ids)
    print(name, r.as_dict())
    assert abs(r.ppl_ratio - 1) <= 0.01, r
    assert r.top1_agreement >= 0.94, r
    # where the top-1 differs, llama.cpp itself nearly ties the two tokens
    assert r.max_reference_margin <= 1.0, r


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_greedy_continuations_match_llama_cpp_until_a_near_tie(name, request):
    """Our greedy 64 tokens, teacher-forced through llama.cpp: at the first position where
    llama.cpp would pick another token, its own logits for the two must nearly tie."""
    m = request.getfixturevalue(name)
    for prompt in PROMPTS:
        ids = m.tokenize(prompt)
        gen = [c.token for c in m.stream(ids, max_tokens=64, temperature=0.0)
               if c.token is not None]
        full = ids + gen
        ref = llama_cpp_logits(m.path, full)
        for i, tok in enumerate(gen):
            row = ref[len(ids) + i - 1]
            if int(row.argmax()) != tok:
                margin = float(row.max() - row[tok])
                print(f"{name} {prompt!r}: first differs at token {i}, llama.cpp margin "
                      f"{margin:.3f}")
                assert margin <= 1.0, (prompt, i, margin)
                break
        else:
            print(f"{name} {prompt!r}: all {len(gen)} greedy tokens equal llama.cpp's")


@pytest.mark.slow
def test_numpy_reference_backend_matches_llama_cpp(smollm2_numpy):
    """The float32 reference path (gguf's dequantizers + numpy) agrees with llama.cpp too."""
    m = smollm2_numpy
    ids = text_ids(m, 256)
    r = compare_logits(m.logits(ids), llama_cpp_logits(m.path, ids), ids)
    assert abs(r.ppl_ratio - 1) <= 0.01 and r.top1_agreement >= 0.94, r


@pytest.mark.parametrize("weights,width", [
    # one layer's projections (Q4_1), then a slice of the tied head (Q8_0)
    (["blk.4.attn_q.weight", "blk.4.attn_k.weight", "blk.4.attn_v.weight",
      "blk.4.attn_output.weight", "blk.4.ffn_gate.weight", "blk.4.ffn_up.weight"], 576),
    (["blk.4.ffn_down.weight"], 1536),
    (["token_embd.weight"], 576),
])
def test_onnxruntime_weight_layout_is_exact(smollm2_file, weights, width):
    """With float activations (accuracy_level 0), the MatMulNBits weights built from GGUF
    blocks reproduce the float32 reference backend's products to rounding error."""
    def segment(g, x):
        rows = (1000, 3000) if weights == ["token_embd.weight"] else None
        return [g.linear(x, w, rows=rows) for w in weights]

    x = np.random.default_rng(0).standard_normal((3, width)).astype(np.float32)
    ref = NumpyBackend().compile(smollm2_file, segment, [width])(x)
    got = OnnxRuntimeBackend(2, accuracy_level=0).compile(smollm2_file, segment, [width])(x)
    for name, r, o in zip(weights, ref, got, strict=True):
        assert r.shape == o.shape == (3, 2000 if name == "token_embd.weight"
                                      else smollm2_file.tensor(name).shape[0])
        np.testing.assert_allclose(o, r, rtol=1e-3, atol=1e-3, err_msg=name)
