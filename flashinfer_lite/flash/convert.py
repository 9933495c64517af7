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


def ensure_converted(gguf_path: Path, progress=progress_line) -> Path:
    """The flash directory for gguf_path, converting it the first time."""
    from ..loaders.flash_format import VERSION

    st = Path(gguf_path).stat()
    # the format version is in the name: builds of different versions never fight over a dir
    out = (cache_dir() / "flash"
           / f"{Path(gguf_path).stem}-{st.st_size}-{st.st_mtime_ns}-v{VERSION}")
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
    return convert(gguf_path, out, calibrate, progress=progress, force=True)
