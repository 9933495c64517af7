"""Reading bundles from flash: page-cache bypass, aligned buffers, coalesced ranges, threads.

O_DIRECT on Linux and F_NOCACHE on macOS keep the OS page cache from holding (and double-
counting) what the neuron pool already holds; where neither works (a filesystem that refuses
O_DIRECT, such as tmpfs) reads fall back to plain buffered reads and `mode` says so.
Direct I/O needs offsets, lengths and buffer addresses aligned to the device's logical block
(probed: 512 B or 4 KiB); reads land in one preallocated anonymous mapping (page-aligned), so
no read allocates.
"""

from __future__ import annotations

import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ALIGN = 4096


def coalesce(starts: np.ndarray, ends: np.ndarray, gap: int,
             align: int = ALIGN) -> list[tuple[int, int]]:
    """Sorted byte ranges -> `align`-aligned (offset, length) reads, merging ranges whose aligned
    extents are within `gap` bytes of each other (reading the gap is cheaper than a call).
    Vectorized: a Python loop over ~1000 ranges per layer cost ~2 ms a call."""
    if len(starts) == 0:
        return []
    a = (np.asarray(starts, np.int64) // align) * align
    b = np.maximum.accumulate(-(-np.asarray(ends, np.int64) // align) * align)
    first = np.ones(len(a), bool)  # does range i open a new read?
    first[1:] = a[1:] - b[:-1] > gap
    opens = np.flatnonzero(first)
    closes = np.append(opens[1:] - 1, len(a) - 1)
    offs, lens = a[opens], b[closes] - a[opens]
    return list(zip(offs.tolist(), lens.tolist(), strict=True))


class FlashReader:
    """Reads aligned ranges of one file into a reusable staging buffer, on a thread pool."""

    PIECE = 256 * 1024

    def __init__(self, path, staging_bytes: int, threads: int = 8, direct: bool = True):
        self.path = str(path)
        self.mode = "buffered"
        flags = os.O_RDONLY
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(self.path, flags | os.O_DIRECT)
                self.mode = "O_DIRECT"
            except OSError:
                self.fd = os.open(self.path, flags)
        else:
            self.fd = os.open(self.path, flags)
            if direct and sys.platform == "darwin":
                import fcntl  # POSIX only: imported where it is used, on macOS

                fcntl.fcntl(self.fd, 48, 1)  # F_NOCACHE
                self.mode = "F_NOCACHE"
        self.capacity = -(-staging_bytes // ALIGN) * ALIGN
        # anonymous (page-aligned) and private: release() gives its pages back
        private = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        self._buf = (mmap.mmap(-1, self.capacity, flags=private) if private
                     else mmap.mmap(-1, self.capacity))
        self.staging = np.frombuffer(self._buf, np.uint8)
        self.align = self._probe_alignment()
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
        self.bytes_read = 0
        self.read_calls = 0
        self.seconds = 0.0

    def _probe_alignment(self) -> int:
        """The finest granularity direct reads accept here: the device's logical block (512 B
        on this disk) lets a 1 KiB bundle be read alone instead of dragging in its 4 KiB
        page's neighbours; where 512 is refused, 4 KiB."""
        if self.mode != "O_DIRECT":
            return 512
        try:
            os.preadv(self.fd, [memoryview(self._buf)[512:1024]], 512)
            return 512
        except OSError:
            return ALIGN

    def _read_batch(self, jobs: list[tuple[int, int, int]]) -> None:
        """(offset, length, staging position) reads, one after another on this thread.
        A short read can only happen past the file's end: sections are padded to 4 KiB."""
        buf, fd = memoryview(self._buf), self.fd
        for offset, length, dest in jobs:
            os.preadv(fd, [buf[dest : dest + length]], offset)

    def read(self, reads: list[tuple[int, int]], base: int = 0) -> list[int]:
        """Read each (offset, length) into the staging buffer, packed in order from `base`;
        returns each read's position in `staging`. Raises ValueError when they do not fit."""
        dests, pos = [], base
        for _, length in reads:
            dests.append(pos)
            pos += length
        if pos > self.capacity:
            raise ValueError(f"{pos - base} bytes of reads exceed the {self.capacity}-byte "
                             f"staging (from {base})")
        # Large reads go out as PIECE-sized pieces: one 1.5 MB O_DIRECT read runs at ~0.75 GB/s
        # here, 256 KiB pieces several at a time at ~1.2 GB/s. All reads of a call are split
        # into one batch per thread, each thread looping over its own batch, so `threads` reads
        # are in flight at once for the cost of one hand-off per thread (a hand-off per read
        # cost more than a 4 KiB read). In flight is what this disk rewards: 16-64 KiB reads
        # run ~3x faster at 8 in flight than one at a time (benchmarks/probe_disk.py).
        jobs = []
        for (off, length), d in zip(reads, dests, strict=True):
            for p in range(0, length, self.PIECE):
                jobs.append((off + p, min(self.PIECE, length - p), d + p))
        t0 = time.perf_counter()
        if self._pool is not None and len(jobs) > 1:
            n = min(self.threads, len(jobs))
            list(self._pool.map(self._read_batch, [jobs[i::n] for i in range(n)]))
        else:
            self._read_batch(jobs)
        self.seconds += time.perf_counter() - t0
        self.bytes_read += pos - base
        self.read_calls += len(reads)
        return dests

    def release(self) -> None:
        """Give the staging buffer's pages back to the OS (they fault back in, zeroed, on the
        next read into them)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._buf.madvise(mmap.MADV_DONTNEED)

    def drop_page_cache(self) -> None:
        """Evict the file from the OS page cache (benchmarks start cold)."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    @property
    def nbytes(self) -> int:
        return self.capacity

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        os.close(self.fd)
        self.staging = None  # the mapping goes with the last view of it
