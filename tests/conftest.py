"""Shared fixtures: the two real models, loaded once per session, and llama.cpp as reference.

Tiers: `python -m pytest` runs the fast tier (unit tests and model tests on the shared models);
tests marked `slow` (llama.cpp references, MLX's CPU device, CLI subprocesses, models loaded
with their own options for long runs) run only with `--run-slow`, which runs both tiers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# the pydoc topics, the real text the tests evaluate on (the beginning; calibration uses the end)
from flashinfer_lite.evaluation import topics_text  # noqa: F401
from flashinfer_lite.loaders.gguf_file import GGUFFile
from flashinfer_lite.registry import resolve_model

ROOT = Path(__file__).resolve().parents[1]
# The command line of the code under test, run from the repository root so that `-m` imports
# this checkout (an installed `flashinfer-lite` script may belong to another copy).
CLI = [sys.executable, "-m", "flashinfer_lite.cli.main"]


def run_cli(*args, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kw)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="run the slow tier too (llama.cpp references, MLX, CLI subprocesses)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow tier: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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


# The shared models. Tests may generate with them (each call starts from the cache it leaves),
# but must not change their options or internals: a test that needs other load options loads
# its own model.
@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    import flashinfer_lite as fl

    return fl.load(smollm2_path, threads=2)


@pytest.fixture(scope="session")
def gemma3(gemma3_path):
    import flashinfer_lite as fl

    return fl.load(gemma3_path, threads=2)


@pytest.fixture(scope="session")
def smollm2_numpy(smollm2_path):
    """The float32 reference backend: exact arithmetic, so cache logic can be checked tightly
    (ONNX Runtime quantizes activations to int8 with different kernels for one row and for
    many, which moves logits by ~0.2 on average between the two paths, as llama.cpp's q8 dot
    products move them from float)."""
    import flashinfer_lite as fl

    return fl.load(smollm2_path, backend="numpy", threads=2)


def cache_state(m):
    """A model's KVState: the ids its KV cache holds and one cache per layer, read through
    the public swap_cache (taken out, put back)."""
    state = m.swap_cache(None)
    m.swap_cache(state)
    return state


def llama_cpp_logits(path, ids) -> np.ndarray:
    """llama.cpp's logits for every position of ids, (len(ids), vocab) float32."""
    from flashinfer_lite.reference import llama_cpp_model

    llm = llama_cpp_model(path, n_ctx=max(512, len(ids) + 8), n_batch=512, logits_all=True,
                          n_threads=2)
    llm.eval(list(ids))
    out = np.array(llm.scores[: len(ids)], np.float32)
    del llm
    return out
