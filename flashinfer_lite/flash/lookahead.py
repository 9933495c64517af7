"""Reading the next layer's likely misses while this layer computes.

Once a decoding token's layer L knows what it needs, the FFN predicts which bundles layer L+1
will need and does not hold (flash/ffn.py says how) and queues their read here: one background
thread hands it to a reader whose own threads keep several reads in flight, into the layer's
slot of a staging ring (depth + 1 slots: the slot a layer computes from is not reused while it
does). The read overlaps layer L's FFN and layer L+1's attention. A layer's pool changes only in
that layer's own call, so "not held" is already exact when the read is queued. Output does not
depend on any of this: the same bytes arrive either way (tests/test_flash.py).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..loaders.direct_io import ALIGN, FlashReader, coalesce


class Lookahead:
    """A ring of depth + 1 layer-sized staging slots filled by one background reader."""

    def __init__(self, path, slot: int, depth: int, gap: int, direct: bool = True,
                 threads: int = 8):
        """slot: staging bytes per layer; a prediction past it reads its hottest bundles
        that fit (the layer reads the rest itself)."""
        if depth < 1:
            raise ValueError(f"lookahead depth must be >= 1; got {depth}")
        self.depth, self.slot_bytes, self.gap = depth, slot, gap
        # + 1: the slot of the layer being consumed is not reused until it has been computed
        self.reader = FlashReader(path, slot * (depth + 1), threads=threads, direct=direct)
        self._bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flash-lookahead")
        self.pending: dict[int, tuple[np.ndarray, list, Future]] = {}
        self.slot_layer: list[int | None] = [None] * (depth + 1)
        self.wait_s = 0.0
        self.bundles_read = 0
        self.bundles_used = 0

    @property
    def nbytes(self) -> int:
        return self.reader.nbytes

    def submit(self, layer: int, bundles: np.ndarray, starts: np.ndarray, stride: int) -> None:
        """Queue a read of `bundles` (sorted bundle ids) of `layer`, at file offsets `starts`."""
        slot = layer % (self.depth + 1)
        owner = self.slot_layer[slot]
        if owner is not None:  # an older prediction nobody took (a prompt ended): drop it
            self._finish(owner)
        # bundles are hot-first: keep those whose span (an upper bound of the coalesced
        # reads' bytes) fits the slot
        fits = starts + stride - starts[0] // ALIGN * ALIGN <= self.slot_bytes - ALIGN
        bundles, starts = bundles[fits], starts[fits]
        if len(bundles) == 0:
            return
        reads = coalesce(starts, starts + stride, self.gap, self.reader.align)
        base = slot * self.slot_bytes
        fut = self._bg.submit(self.reader.read, reads, base)
        self.pending[layer] = (bundles, reads, fut)
        self.slot_layer[slot] = layer
        self.bundles_read += len(bundles)

    def _finish(self, layer: int):
        bundles, reads, fut = self.pending.pop(layer)
        self.slot_layer[layer % (self.depth + 1)] = None
        t0 = time.perf_counter()
        dests = fut.result()
        self.wait_s += time.perf_counter() - t0
        return bundles, reads, dests

    def take(self, layer: int):
        """(bundles, reads, dests) read for `layer`, waiting for them; None if none queued.
        The slot stays valid until the next submit that maps onto it (depth layers later)."""
        if layer not in self.pending:
            return None
        return self._finish(layer)

    def drain(self) -> None:
        """Finish every queued read and forget it."""
        for layer in list(self.pending):
            self._finish(layer)

    def release(self) -> None:
        """Drain, and give the ring's pages back: a prompt's chunks take their memory (the
        planner counts the larger of the two, planning.pool_plan)."""
        self.drain()
        self.reader.release()

    def close(self) -> None:
        self.drain()
        self._bg.shutdown(wait=True)
        self.reader.close()
