"""Shared fixtures: the two real models, loaded once per session, and llama.cpp as reference."""

from __future__ import annotations

import numpy as np
import pytest

from flashinfer_lite.evaluation import topics_text  # noqa: F401  (tests import it from here)
from flashinfer_lite.loaders.gguf_file import GGUFFile
from flashinfer_lite.registry import resolve_model


@pytest.fixture(scope="session")
def smollm2_path():
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path():
    return resolve_model("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2_file(smollm2_path):
    return GGUFFile(smollm2_path)


@pytest.fixture(scope="session")
def gemma3_file(gemma3_path):
    return GGUFFile(gemma3_path)


@pytest.fixture(scope="session")
def flash_dir(tmp_path_factory, smollm2_path):
    """SmolLM2 converted to the flash format once per test session."""
    from flashinfer_lite.flash.calibration import calibrate
    from flashinfer_lite.flash.convert import convert

    out = tmp_path_factory.mktemp("flash") / "smollm2.flash"
    return convert(smollm2_path, out, lambda f: calibrate(f, n_tokens=256))


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    import flashinfer_lite as fl

    return fl.load(smollm2_path, threads=2)


@pytest.fixture(scope="session")
def gemma3(gemma3_path):
    import flashinfer_lite as fl

    return fl.load(gemma3_path, threads=2)




def llama_cpp_logits(path, ids) -> np.ndarray:
    """llama.cpp's logits for every position of ids, (len(ids), vocab) float32."""
    from flashinfer_lite.reference import llama_cpp_model

    llm = llama_cpp_model(path, n_ctx=max(512, len(ids) + 8), n_batch=512, logits_all=True,
                          n_threads=2)
    llm.eval(list(ids))
    out = np.array(llm.scores[: len(ids)], np.float32)
    del llm
    return out
