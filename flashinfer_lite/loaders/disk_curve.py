"""The disk's measured read curve (benchmarks/probe_disk.py): bandwidth by read size and reads
in flight, and the coalescing gap it implies.

The probe writes its rows to `cache_dir() / "disk_probe.json"`; `load_curve` reads them back,
averaging repeated runs, and returns None where this machine was never probed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..registry import cache_dir

PROBE_FILE = "disk_probe.json"


class DiskCurve:
    """Bytes/s of random reads of `size` bytes with `depth` in flight, interpolated in
    log2(size) and log2(depth) between measured points and clamped outside them (bandwidth
    flattens past the largest size and depth measured)."""

    def __init__(self, points: dict[tuple[int, int], float]):
        if not points:
            raise ValueError("a disk curve needs at least one (size, depth) point")
        by_size: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for (size, depth), bw in points.items():
            by_size[size].append((depth, bw))
        self.sizes = sorted(by_size)
        # size -> (log2 depths, bandwidths), depths ascending; sizes may differ in depths
        self._by_size = {}
        for s, v in by_size.items():
            depths, bws = zip(*sorted(v), strict=True)
            self._by_size[s] = (np.log2(depths), np.array(bws))

    def bandwidth(self, size: int, depth: int) -> float:
        """Bytes/s for reads of `size` bytes with `depth` of them in flight."""
        at_depth = [float(np.interp(np.log2(max(depth, 1)), *self._by_size[s])) for s in self.sizes]
        return float(np.interp(np.log2(max(size, 1)), np.log2(self.sizes), at_depth))

    def coalesce_gap(self, depth: int) -> int:
        """Bytes of unwanted data between two wanted ranges below which one read spanning both
        is cheaper than two reads. With `depth` reads in flight one more read adds 1/(reads/s)
        to the batch, its latency divided by the depth (Little's law), cheapest at the best
        size measured; reading the gap instead adds gap / bandwidth. They break even at
        gap = (seconds per read) x (the ceiling's bytes/s at that depth)."""
        seconds_per_read = min(s / self.bandwidth(s, depth) for s in self.sizes)
        ceiling = max(self.bandwidth(s, depth) for s in self.sizes)
        return int(seconds_per_read * ceiling)


def load_curve(path: str | Path | None = None, engine: str = "fio") -> DiskCurve | None:
    """The probe's curve for `engine` ("fio": io_uring, what a native reader can reach;
    "python": a thread pool of os.preadv), or None when the file or the engine's rows are
    missing."""
    path = Path(path) if path is not None else cache_dir() / PROBE_FILE
    if not path.exists():
        return None
    sums: dict[tuple[int, int], list[float]] = defaultdict(list)
    for row in json.loads(path.read_text())["rows"]:
        if row["engine"] == engine:
            sums[(int(row["size"]), int(row["depth"]))].append(row["mb_s"] * 1e6)
    if not sums:
        return None
    return DiskCurve({k: float(np.mean(v)) for k, v in sums.items()})
