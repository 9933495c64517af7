"""Both real models against llama.cpp on real text (pydoc topics), and greedy continuations."""

import numpy as np
import pytest
from conftest import llama_cpp_logits, topics_text

from flashinfer_lite.evaluation import compare_logits

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


def test_numpy_reference_backend_matches_llama_cpp(smollm2_path):
    """The float32 reference path (gguf's dequantizers + numpy) agrees with llama.cpp too."""
    import flashinfer_lite as fl

    m = fl.load(smollm2_path, backend="numpy")
    ids = text_ids(m, 256)
    r = compare_logits(m.logits(ids), llama_cpp_logits(m.path, ids), ids)
    assert abs(r.ppl_ratio - 1) <= 0.01 and r.top1_agreement >= 0.94, r
    m.close()


def test_onnxruntime_weight_layout_is_exact(smollm2_path):
    """With float activations (accuracy_level 0), the MatMulNBits weights built from GGUF
    blocks reproduce the float32 reference backend to rounding error, layer by layer."""
    from flashinfer_lite.config import ModelConfig
    from flashinfer_lite.kernels.numpy_backend import NumpyBackend
    from flashinfer_lite.kernels.onnxruntime_backend import OnnxRuntimeBackend
    from flashinfer_lite.loaders.gguf_file import GGUFFile
    from flashinfer_lite.models.llama import LlamaModel

    f = GGUFFile(smollm2_path)
    cfg = ModelConfig.from_gguf(f)
    x = np.random.default_rng(0).standard_normal((3, cfg.d_model)).astype(np.float32)
    a = np.random.default_rng(1).standard_normal((3, cfg.d_model)).astype(np.float32)
    outs = []
    for backend in (NumpyBackend(), OnnxRuntimeBackend(2, accuracy_level=0)):
        model = LlamaModel.__new__(LlamaModel)
        model.file, model.cfg, model.ffn = f, cfg, None
        seg = backend.compile(f, lambda g, x, a, m=model: m._segment(g, x, a, 4), [576, 576])
        outs.append(seg(x, a))
    for ref, got in zip(*outs, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
