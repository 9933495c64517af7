"""Vocabulary rows on flash: the embedding (= tied output head) one row per token, hot-first.

    vocab.bin        the token embedding's GGUF rows, bit-exact, in `order` (most frequent
                     tokens on calibration text first), back to back (no padding: a row is read
                     as the 512-byte sectors that hold it, at most two)
    vocab_order.npy  (V,) int32: slot -> token id

Rows of the `hot` first slots are read once at load and stay (one sequential read); other rows
come from flash on demand and the most recently used `cache_rows` stay in an LRU pool (the
candidates of consecutive tokens overlap: windowing, as for neurons). Rows stay in their GGUF
encoding in DRAM and are dequantized only when used.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from ..loaders.direct_io import FlashReader, coalesce

SECTOR = 512


class VocabRows:
    def __init__(self, path, order: np.ndarray, qtype: GGMLQuantizationType, d_model: int,
                 hot_rows: int, cache_rows: int, max_batch: int = 2048, direct: bool = True):
        per, size = GGML_QUANT_SIZES[qtype]
        self.qtype, self.d = qtype, d_model
        self.row_bytes = d_model // per * size
        self.order = np.asarray(order, np.int32)  # slot -> id
        self.n = len(self.order)
        self.slot_of = np.empty(self.n, np.int32)  # id -> slot
        self.slot_of[self.order] = np.arange(self.n)
        self.hot = int(min(max(hot_rows, 0), self.n))
        self.max_batch = max_batch
        # the largest read is one batch of rows, each spanning at most two extra sectors
        staging = max(max_batch * (self.row_bytes + 2 * SECTOR), self.hot * self.row_bytes
                      + 2 * SECTOR)
        self.reader = FlashReader(path, staging, threads=4, direct=direct)
        self.hot_raw = self._read_slots(np.arange(self.hot))  # (hot, row_bytes)
        self.cache_rows = int(max(cache_rows, 0))
        self._pool = np.empty((self.cache_rows, self.row_bytes), np.uint8)
        self._where: OrderedDict[int, int] = OrderedDict()  # slot -> pool index, LRU first
        self.lookups = self.hits = 0
        self.seconds = 0.0

    @property
    def nbytes(self) -> int:
        """DRAM held: hot rows, the LRU pool, the read staging buffer, the slot map."""
        return (self.hot_raw.nbytes + self._pool.nbytes + self.reader.nbytes
                + self.slot_of.nbytes + self.order.nbytes)

    def _read_slots(self, slots: np.ndarray) -> np.ndarray:
        """Raw rows of sorted `slots` from flash -> (n, row_bytes) uint8."""
        out = np.empty((len(slots), self.row_bytes), np.uint8)
        for s in range(0, len(slots), self.max_batch):
            part = slots[s : s + self.max_batch]
            starts = part.astype(np.int64) * self.row_bytes
            reads = coalesce(starts, starts + self.row_bytes, gap=SECTOR,
                             align=self.reader.align)
            dests = self.reader.read(reads)
            buf = self.reader.staging
            r = 0
            for (off, length), d in zip(reads, dests, strict=True):
                while r < len(part) and starts[r] + self.row_bytes <= off + length:
                    a = d + int(starts[r]) - off
                    out[s + r] = buf[a : a + self.row_bytes]
                    r += 1
        return out

    def raw(self, ids: np.ndarray) -> np.ndarray:
        """(n,) token ids -> (n, row_bytes) raw rows: hot, pooled, or read (then pooled)."""
        t0 = time.perf_counter()
        slots = self.slot_of[np.asarray(ids, np.int64)]
        out = np.empty((len(slots), self.row_bytes), np.uint8)
        hot = slots < self.hot
        out[hot] = self.hot_raw[slots[hot]]
        missing = []
        for i in np.flatnonzero(~hot):
            s = int(slots[i])
            j = self._where.get(s)
            if j is None:
                missing.append(i)
            else:
                self._where.move_to_end(s)
                out[i] = self._pool[j]
        self.lookups += len(slots)
        self.hits += len(slots) - len(missing)
        if missing:
            miss = np.asarray(missing)
            uniq, inverse = np.unique(slots[miss], return_inverse=True)
            rows = self._read_slots(uniq)
            out[miss] = rows[inverse]
            for s, row in zip(uniq.tolist(), rows, strict=True):
                self._remember(s, row)
        self.seconds += time.perf_counter() - t0
        return out

    def _remember(self, slot: int, row: np.ndarray) -> None:
        if self.cache_rows == 0:
            return
        if len(self._where) < self.cache_rows:
            j = len(self._where)
        else:
            _, j = self._where.popitem(last=False)  # least recently used gives its place
        self._pool[j] = row
        self._where[slot] = j

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """(n,) ids -> (n, d) float32."""
        return dequantize(self.raw(ids), self.qtype).reshape(len(ids), self.d)

    def stream(self, step: int = 2048):
        """Every row once, in slot order, bypassing the pool: yields (ids (n,), rows (n, d))."""
        for s in range(0, self.n, step):
            slots = np.arange(s, min(self.n, s + step))
            raw = self._read_slots(slots)
            yield self.order[slots], dequantize(raw, self.qtype).reshape(len(slots), self.d)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def report(self) -> dict:
        return {"vocab_bytes_read": self.reader.bytes_read, "vocab_reads": self.reader.read_calls,
                "vocab_io_s": self.reader.seconds, "vocab_rows_cache_hit_rate": self.hit_rate,
                "vocab_hot_rows": self.hot, "vocab_cache_rows": self.cache_rows,
                "vocab_bytes": self.nbytes}

    def close(self) -> None:
        self.reader.close()
