"""The FFN gate on flash: which neurons fire, computed exactly from the gate's own rows.

Each layer's gate rows sit in gate.bin in the bundles' (hot-first) order, in their GGUF blocks;
kernels/bundle_ffn.raw_matvec multiplies them as they are. The first `held` rows of every layer
stay in DRAM; the rest of a layer is read whole each time the layer runs. Unlike the bundles,
what the gate needs is known before the hidden state is: all of it. So the next layer's rows are
read on a background thread while this layer computes, into a ring of two slots.

Why the gate gets DRAM before the neuron pools (flash/planner.py): every token reads every
gate row that is not held, so a held row saves its whole size per token; a pooled bundle saves
its size only on the tokens that need that neuron (~70% of them for the hottest).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..kernels.bundle_ffn import dequantize_raw, raw_matvec
from ..kernels.ggml_dot import kernel as ggml_kernel
from ..loaders.direct_io import ALIGN, FlashReader
from ..loaders.flash_format import FlashManifest

# from this many rows of x, decode the gate rows once and use BLAS: with ggml's dot products
# (kernels/ggml_dot.py) the crossover is ~32 rows (a 1.5B layer: 14.7 vs 14.2 ms), with the
# numba decoders ~8
DENSE_ROWS, DENSE_ROWS_NUMBA = 32, 8
DECODE_ROWS = 1024  # gate rows decoded at a time on that path (6 MB of float32 at d = 1536)


class FlashGate:
    def __init__(self, manifest: FlashManifest, held: int, threads: int = 8,
                 direct: bool = True, compute_threads: int = 1):
        lay = manifest.layout
        self.manifest, self.layout = manifest, lay
        self.n_layers = manifest.data["n_layers"]
        self.held = int(min(max(held, 0), lay.ffn_dim))
        self.compute_threads = max(1, compute_threads)
        self.dense_rows = DENSE_ROWS if ggml_kernel(lay.gate_type) else DENSE_ROWS_NUMBA
        gb = lay.gate_bytes
        self.rows: list[np.ndarray] = []  # held rows, (held, gate_bytes) uint8 per layer
        # the streamed rows [held, ffn): an aligned read from the row's 512 B / 4 KiB boundary
        first = self.held * gb
        self._skip = first % ALIGN  # bytes before row `held` in that read
        self._stream = lay.gate_section - (first - self._skip)
        slots = 2 if self.held < lay.ffn_dim else 0
        held_read = -(-first // ALIGN) * ALIGN  # the held rows, read once at load
        self.reader = FlashReader(manifest.gate_path, max(self._stream * slots, held_read, ALIGN),
                                  threads=threads, direct=direct)
        for i in range(self.n_layers if self.held else 0):  # one sequential read per layer
            self.reader.read([(manifest.gate_offset(i), held_read)])
            self.rows.append(self.reader.staging[:first].reshape(self.held, gb).copy())
        self._bg = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate-read")
                    if slots else None)
        self._pending: dict[int, Future] = {}
        self._landed: int | None = None  # the layer whose streamed rows sit in its slot
        self.reset_counters()

    def reset_counters(self) -> None:
        # counted when a read is queued (exact whether or not it has landed yet)
        self.bytes_read = self.read_calls = 0
        self.reader.seconds = 0.0
        self.wait_s = self.compute_s = 0.0

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows) + self.reader.nbytes

    def _slot(self, layer: int) -> int:
        return (layer % 2) * self._stream

    def _submit(self, layer: int) -> None:
        off = self.manifest.gate_offset(layer) + self.held * self.layout.gate_bytes - self._skip
        self._pending[layer] = self._bg.submit(self.reader.read, [(off, self._stream)],
                                               self._slot(layer))
        self.bytes_read += self._stream
        self.read_calls += 1

    def _streamed(self, layer: int) -> np.ndarray:
        """Layer's rows [held, ffn) as (ffn - held, gate_bytes), reading them if not queued;
        queues the next layer's (wrapping into the next token) before returning. Asked again
        for the layer that landed last (the FFN predicts a layer from the one before, then
        computes it exactly), the rows are still in their slot: the read is not repeated."""
        if layer == self._landed and layer not in self._pending:
            return self._rows_in_slot(layer)
        if layer not in self._pending:
            self._submit(layer)
        t0 = time.perf_counter()
        self._pending.pop(layer).result()
        self.wait_s += time.perf_counter() - t0
        self._landed = layer
        nxt = (layer + 1) % self.n_layers
        if nxt not in self._pending:
            self._submit(nxt)  # the other slot: this layer's stays valid until nxt + 1
        return self._rows_in_slot(layer)

    def _rows_in_slot(self, layer: int) -> np.ndarray:
        lay = self.layout
        start = self._slot(layer) + self._skip
        n = lay.ffn_dim - self.held
        return self.reader.staging[start : start + n * lay.gate_bytes].reshape(n, lay.gate_bytes)

    def preact(self, layer: int, h: np.ndarray) -> np.ndarray:
        """h (T, d) -> the gate's pre-activations (T, ffn), in bundle order."""
        lay = self.layout
        x = np.ascontiguousarray(h, np.float32)
        out = np.empty((x.shape[0], lay.ffn_dim), np.float32)
        parts = [(0, self.rows[layer])] if self.held else []
        if self.held < lay.ffn_dim:
            parts.append((self.held, self._streamed(layer)))
        t0 = time.perf_counter()
        for start, rows in parts:
            if x.shape[0] >= self.dense_rows:
                for a in range(0, len(rows), DECODE_ROWS):
                    w = dequantize_raw(rows[a : a + DECODE_ROWS], lay.gate_type, lay.d_model)
                    out[:, start + a : start + a + len(w)] = x @ w.T  # (T, n)
            else:
                raw_matvec(x, rows, lay.gate_type, out[:, start : start + len(rows)],
                           self.compute_threads)
        self.compute_s += time.perf_counter() - t0
        return out

    def drain(self) -> None:
        for fut in self._pending.values():
            fut.result()
        self._pending.clear()
        self._landed = None

    def report(self) -> dict:
        return {"gate_rows_held": self.held, "gate_bytes_read": self.bytes_read,
                "gate_reads": self.read_calls, "gate_read_s": self.reader.seconds,
                "gate_wait_s": self.wait_s, "gate_compute_s": self.compute_s}

    def close(self) -> None:
        self.drain()
        if self._bg is not None:
            self._bg.shutdown(wait=True)
        self.reader.close()
