"""Memory sizes: parsing the user's budget, and reading what the process really holds."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import re
import resource
import sys

import psutil

from .errors import InvalidArgumentError

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1024**2,
          "g": 1e9, "gb": 1e9, "gib": 1024**3, "t": 1e12, "tb": 1e12, "tib": 1024**4}

# Working memory of a running model beyond weights, pools, staging and KV: ONNX Runtime's
# attention sessions (built on a prompt's first use: +14 MB on Qwen2.5-Coder-1.5B), its
# activations for a prefill chunk, numpy temporaries, the sampler. Measured: the first
# generation adds ~11 MB of RSS besides its KV cache on SmolLM2 (benchmarks/bench_budget.py),
# ~25 MB on the 1.5B.
WORKING_BYTES = 32 << 20


def parse_budget(budget, model_bytes: int) -> int | None:
    """None -> None (planner reads free memory); "300MB", "1.5GB", "512MiB", int bytes, or a
    float in (0, 1] meaning a fraction of the model file -> bytes."""
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise InvalidArgumentError(f"memory_budget must be a size; got {budget!r}")
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise InvalidArgumentError(
                f"a fractional memory_budget must be in (0, 1]; got {budget!r}")
        return int(budget * model_bytes)
    if isinstance(budget, int):
        if budget <= 0:
            raise InvalidArgumentError(f"memory_budget must be positive; got {budget!r}")
        return budget
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidArgumentError(
            f"memory_budget must look like '300MB', '1.5GB' or 0.5; got {budget!r}")
    if not m.group(2) and float(m.group(1)) <= 1:  # "0.5": a fraction, as the CLI reads it
        return parse_budget(float(m.group(1)), model_bytes)
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise InvalidArgumentError(f"memory_budget must be positive; got {budget!r}")
    return int(value)


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """The process's peak resident set since it started (ru_maxrss: KiB on Linux, B on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise): after loading, the
    temporaries of weight conversion are ~40 MB of RSS that nothing uses."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to do
            ctypes.CDLL("libc.so.6").malloc_trim(0)


# glibc's mallopt parameter: allocations of at least this many bytes get their own mapping
M_MMAP_THRESHOLD = -3
HEAP_MMAP_THRESHOLD = 128 << 10


def limit_heap_retention() -> bool:
    """Make glibc hand every allocation of 128 KiB or more its own mapping, returned to the OS
    on free. By default the threshold rises to the largest block freed so far (up to 32 MiB),
    after which big temporaries (a prefill's dequantized rows, ORT's initializer copies) come
    from the heap and stay in RSS when freed: Gemma 3 at a 300 MB budget held 328 MB after 32
    tokens and peaked at 344 MB while loading; with a 1 MiB threshold, 287 and 304 MB. Below
    1 MiB the heap still grew with the context (temporaries sized by it, such as attention's
    per-call key and value copies, freed but not reusable for the next, larger ones):
    Qwen2.5-Coder-1.5B at a 560 MB budget after a 1,000-token prompt held 583 MB, peak 598;
    at 128 KiB, 542 and 559. Process-wide, so only applied when a memory budget is asked for.
    Returns whether it was applied (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl)
        return False


def release_mapped_pages(*arrays) -> None:
    """Drop the pages of memory-mapped arrays (np.load(mmap_mode="r")) from our resident set;
    they stay in the page cache and fault back in if read again. Arrays without a mapping are
    left alone."""
    for a in arrays:
        mm = getattr(a, "_mmap", None)
        if mm is None and getattr(a, "base", None) is not None:
            mm = getattr(a.base, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
