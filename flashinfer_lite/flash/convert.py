"""Converting a GGUF into the flash format, once, into the user cache directory."""

from __future__ import annotations

import sys
from pathlib import Path

from ..loaders.flash_format import convert
from ..registry import cache_dir
from .calibration import calibrate


def progress_line(step: int, total: int, what: str) -> None:
    """A one-line progress bar on stderr."""
    width = 30
    done = int(width * step / max(total, 1))
    end = "\n" if step >= total else ""
    print(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} {what:<36}", end=end,
          file=sys.stderr, flush=True)


FINGERPRINT_BYTES = 1 << 20  # read from each end of the GGUF for its cache key


def fingerprint(gguf_path: Path) -> str:
    """A key for the file's content that a copy, a reinstall or a touch keeps: the size and a
    hash of its first and last MiB (the header, the metadata, and weights at the end). The
    modification time, the key before, changed with every reinstall of a model package, so
    each left a stale conversion of up to ~220 MB behind."""
    import hashlib

    path = Path(gguf_path)
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as fh:
        h.update(fh.read(FINGERPRINT_BYTES))
        fh.seek(max(0, size - FINGERPRINT_BYTES))
        h.update(fh.read(FINGERPRINT_BYTES))
    return f"{size}-h{h.hexdigest()}"


def _remove_legacy(out: Path, stem: str) -> None:
    """Drop conversions of this model under the old modification-time keys
    (STEM-SIZE-MTIME[-vN]): no current build reads them. Entries under content keys stay."""
    import re
    import shutil

    legacy = re.compile(re.escape(stem) + r"-\d+-\d+(-v\d+)?")
    for d in out.parent.iterdir():
        if d != out and d.is_dir() and legacy.fullmatch(d.name):
            shutil.rmtree(d, ignore_errors=True)


def ensure_converted(gguf_path: Path, progress=progress_line) -> Path:
    """The flash directory for gguf_path, converting it the first time."""
    from ..loaders.flash_format import VERSION

    stem = Path(gguf_path).stem
    # the format version is in the name: builds of different versions never fight over a dir
    out = cache_dir() / "flash" / f"{stem}-{fingerprint(gguf_path)}-v{VERSION}"
    if (out / "manifest.json").exists():
        import json

        try:
            if json.loads((out / "manifest.json").read_text()).get("version") == VERSION:
                return out
        except ValueError:
            pass  # unreadable: convert again
    out.parent.mkdir(parents=True, exist_ok=True)
    if progress is progress_line:  # an app's own callback shows progress its own way
        print(f"flashinfer-lite: converting {Path(gguf_path).name} to the flash format in {out} "
              "(once) ...", file=sys.stderr, flush=True)
    done = convert(gguf_path, out, calibrate, progress=progress, force=True)
    _remove_legacy(out, stem)
    return done
