"""Bad input: one FlashInferError subclass from the API, one line and a non-zero exit from the
CLI, never a traceback."""

import numpy as np
import pytest
from conftest import run_cli

import flashinfer_lite as fl
from flashinfer_lite.errors import (
    ContextLengthError,
    FlashInferError,
    InvalidArgumentError,
    InvalidModelFileError,
    ModelNotFoundError,
    UnsupportedModelError,
)


def assert_one_line_error(proc, needle):
    assert proc.returncode != 0, proc
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), proc.stderr
    assert needle.lower() in lines[0].lower(), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, smollm2_path):
    d = tmp_path_factory.mktemp("bad")
    text = d / "notes.gguf"
    text.write_text("these are my notes, not a model\n" * 10)
    data = smollm2_path.read_bytes()
    half = d / "half.gguf"
    half.write_bytes(data[: len(data) // 2])
    header_cut = d / "header_cut.gguf"
    header_cut.write_bytes(data[:3000])
    return {"text": text, "half": half, "header_cut": header_cut}


def write_gguf(path, arch, qtype=None):
    """A tiny well-formed GGUF with the given architecture (and embedding quant type)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    if qtype is None:
        w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    else:
        per_block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.zeros((16, 32 // per_block * size), np.uint8)
        w.add_tensor("token_embd.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    import gguf

    d = tmp_path_factory.mktemp("odd")
    return {"arch": write_gguf(d / "mamba.gguf", "mamba"),
            "quant": write_gguf(d / "iq.gguf", "llama", gguf.GGMLQuantizationType.IQ4_NL)}


def test_api_missing_file():
    with pytest.raises(ModelNotFoundError, match="not found"):
        fl.load("/nonexistent/model.gguf")


def test_api_unknown_short_name():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        fl.load("llama-70b")


@pytest.mark.parametrize("which,match", [("text", "not a GGUF"), ("half", "truncated"),
                                         ("header_cut", "truncated|damaged")])
def test_api_bad_files(bad_files, which, match):
    with pytest.raises(InvalidModelFileError, match=match):
        fl.load(bad_files[which])


def test_api_unsupported_architecture(odd_models):
    with pytest.raises(UnsupportedModelError, match="mamba"):
        fl.load(odd_models["arch"])


def test_api_unsupported_quant_type_names_tensor_and_type(odd_models):
    with pytest.raises(UnsupportedModelError, match="token_embd.weight.*IQ4_NL"):
        fl.load(odd_models["quant"])


def test_api_prompt_longer_than_context(smollm2_path, smollm2):
    m = fl.load(smollm2_path, ctx_size=16, threads=2)
    with pytest.raises(ContextLengthError, match="16"):
        m.generate("word " * 40, max_tokens=4)
    with pytest.raises(ContextLengthError):
        m.logits(list(range(20)))
    # the model stays usable after the error: it answers as the full-context model does
    smollm2.reset()
    assert m.generate("Hi", max_tokens=2) == smollm2.generate("Hi", max_tokens=2)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(max_tokens=-3),
                                dict(top_k=-2), dict(repeat_penalty=0)])
def test_api_bad_sampling_arguments(smollm2, kw):
    with pytest.raises(InvalidArgumentError):
        smollm2.generate("Hi", **{"max_tokens": 2, **kw})


@pytest.mark.parametrize("kw", [dict(backend="tpu"), dict(kv_cache="q3"),
                                dict(memory_budget="lots"), dict(memory_budget=-5),
                                dict(memory_budget=1.5), dict(token_filter="magic")])
def test_api_bad_load_options(smollm2_path, kw):
    with pytest.raises(FlashInferError):
        fl.load(smollm2_path, **kw)


def test_api_bad_token_ids(smollm2):
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        smollm2.logits([1, 2, 10**7])
    with pytest.raises(InvalidArgumentError):
        smollm2.logits([])


def test_errors_are_one_family():
    for cls in (ModelNotFoundError, InvalidModelFileError, UnsupportedModelError,
                ContextLengthError, InvalidArgumentError):
        assert issubclass(cls, FlashInferError)


# ---- the CLI: one line, non-zero exit, no traceback ---------------------------------------
@pytest.mark.slow
def test_cli_missing_file():
    assert_one_line_error(run_cli("generate", "-m", "/nope/x.gguf", "-p", "hi"), "not found")


@pytest.mark.slow
def test_cli_text_file_renamed(bad_files):
    assert_one_line_error(run_cli("generate", "-m", str(bad_files["text"]), "-p", "hi"),
                          "not a GGUF")


@pytest.mark.slow
def test_cli_truncated_file(bad_files):
    assert_one_line_error(run_cli("inspect", str(bad_files["half"])), "truncated")


@pytest.mark.slow
def test_cli_unsupported_architecture(odd_models):
    assert_one_line_error(run_cli("generate", "-m", str(odd_models["arch"]), "-p", "hi"),
                          "architecture 'mamba'")


@pytest.mark.slow
def test_cli_prompt_longer_than_context():
    assert_one_line_error(run_cli("generate", "-c", "16", "-p", "word " * 40, "-n", "4"),
                          "context")


@pytest.mark.slow
def test_cli_negative_temperature():
    assert_one_line_error(run_cli("generate", "-p", "hi", "--temp", "-1"), "temperature")


@pytest.mark.slow
def test_cli_bad_flag():
    assert_one_line_error(run_cli("generate", "--no-such-flag"), "no such option")
    assert_one_line_error(run_cli("generate", "-p", "hi", "-n", "lots"), "lots")
