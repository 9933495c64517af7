"""The flash-resident FFN with its neuron pool on the MLX device (GPU).

The host side is FlashFFN's, unchanged: the skip rule, windowing, the host pool's swap-delete
bookkeeping and the direct-I/O reads into its staging buffer. Each layer's pool also has a
preallocated device twin (capacity, stride) uint8 holding the same bundles byte for byte; after
the host bookkeeping, the rows whose neuron changed (inserted, or moved by a swap-delete) are
copied host -> device in one scatter, so a token moves to the GPU exactly the bundles it read.
The GPU decodes the pool's blocks (GGUF Q4_0 / Q4_1 / Q5_0 / Q8_0 up rows, Q8_0 down columns)
to float32 and multiplies densely over the pool, with zero coefficients for inactive rows: on a
GPU that costs less than gathering the active rows.

"naive" re-reads the layer's whole FFN section every call and copies all of it to the device.

The host computes each layer's gate (flash/gate.py) to choose neurons, so every layer waits
for the GPU once (`device_wait_s`: attention and the previous FFN finishing) before its reads
start; the bundle reads of one layer do not overlap the GPU work of the previous one. On Apple
silicon memory is unified: the "copy" to the device is a copy within the same DRAM (MLX arrays
live in shared memory), so the twin pool could be dropped in favour of the host pool itself.
"""

from __future__ import annotations

import time

import numpy as np
from gguf import GGMLQuantizationType as Q

from ..cache.neuron_pool import RawNeuronPool
from ..errors import UnsupportedModelError
from ..loaders.quant_grid import BLOCK32, block32_fields
from .ffn import FlashFFN

DEVICE_UP_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0)  # what decode_rows decodes (32-blocks)


def decode_rows(mx, raw, qtype: Q, k: int):
    """GGUF blocks of rows raw (n, k/32 * block bytes) uint8 (MLX) -> (n, k) float32 (MLX)."""
    n = raw.shape[0]
    b = raw.reshape(n, k // 32, BLOCK32[qtype].nbytes)  # (n, blocks, bytes)
    q, d, m = block32_fields(mx, b, qtype)  # (n, blocks, 32), (n, blocks, 1) x2
    q = q.astype(mx.float32)
    if qtype == Q.Q4_1:
        return (d * q + m).reshape(n, k)
    zero = BLOCK32[qtype].zero
    return (d * (q - float(zero)) if zero else d * q).reshape(n, k)


class _DevicePool:
    """The device twin of one RawNeuronPool: the same bundles in the same slots."""

    def __init__(self, mx, capacity: int, stride: int):
        self.raw = mx.zeros((capacity, stride), mx.uint8)
        self.neuron_of = np.full(capacity, -1, np.int64)  # what each device slot holds


class MlxFlashFFN(FlashFFN):
    READ_IN_PLACE = False  # every bundle it computes goes through a pool and its device twin
    def __init__(self, manifest, activation, capacity, backend, overlap: bool = True, **kw):
        """overlap: start each layer's FFN on the GPU as soon as it is built (mx.async_eval)."""
        self.mx = backend.mx
        self.overlap = overlap
        # decoding + both matmuls as one compiled graph (fused elementwise decode)
        self._ffn = self.mx.compile(self._ffn_fn)
        self._twins: dict[int, _DevicePool] = {}
        super().__init__(manifest, activation, capacity, **kw)
        if self.layout.up_type not in DEVICE_UP_TYPES:
            raise UnsupportedModelError(
                f"the GPU flash FFN decodes {', '.join(t.name for t in DEVICE_UP_TYPES)} up "
                f"rows; this model's are {self.layout.up_type.name}")
        for k in ("h2d_bytes", "h2d_s", "device_wait_s"):
            self.stats[k] = 0 if k == "h2d_bytes" else 0.0

    def _twin(self, pool) -> _DevicePool:
        """The layer pools' (and naive's scratch pool's) twins persist; a pool made for one
        call (the misses that did not fit) gets a transient one."""
        twin = self._twins.get(id(pool))
        if twin is None:
            twin = _DevicePool(self.mx, pool.capacity, self.layout.stride)
            if pool is self.scratch or id(pool) in self._pools_ids:
                self._twins[id(pool)] = twin
        return twin

    def _upload(self, pool: RawNeuronPool):
        """Copy the pool rows whose neuron differs from the device's into the twin."""
        mx = self.mx
        twin = self._twin(pool)
        live = pool.count
        if self.mode == "naive" or pool is self.scratch or id(pool) not in self._pools_ids:
            changed = np.arange(live)  # per-call pools: everything moves every call
        else:
            changed = np.nonzero(pool.neuron_of[:live] != twin.neuron_of[:live])[0]
        if len(changed):
            t0 = time.perf_counter()
            rows = pool.raw[changed]
            # host side of the copy (staging into MLX memory); the device scatter itself runs
            # with the layer's FFN, inside the next wait (no extra synchronization per layer)
            twin.raw[mx.array(changed)] = mx.array(rows)
            twin.neuron_of[changed] = pool.neuron_of[changed]
            self.stats["h2d_bytes"] += rows.nbytes
            self.stats["h2d_s"] += time.perf_counter() - t0
        twin.neuron_of[live:] = -1
        return twin

    @property
    def _pools_ids(self) -> set[int]:
        return {id(p) for p in self.pools} if self.pools is not None else set()

    def _warm(self) -> None:
        self.stats.update(h2d_bytes=0, h2d_s=0.0, device_wait_s=0.0)
        super()._warm()
        for pool in self.pools:
            self._upload(pool)
        self.stats["h2d_bytes"], self.stats["h2d_s"] = 0, 0.0

    def reset_counters(self) -> None:
        super().reset_counters()
        for k in ("h2d_bytes", "h2d_s", "device_wait_s"):
            if k in self.stats:
                self.stats[k] = 0 if k == "h2d_bytes" else 0.0

    def __call__(self, layer, h):
        t0 = time.perf_counter()
        h = np.asarray(h, np.float32)  # waits for the GPU: the host computes the gate
        self.stats["device_wait_s"] += time.perf_counter() - t0
        return super().__call__(layer, h)

    def _compute(self, h, a, active, pool):
        if not isinstance(pool, RawNeuronPool):
            return super()._compute(np.asarray(h, np.float32), a, active, pool)
        mx, lay = self.mx, self.layout
        twin = self._upload(pool)
        n = pool.count
        if n == 0:
            return mx.zeros((h.shape[0], lay.d_model), mx.float32)
        # coefficient of each pool row for each token: act(gate) where the row is active
        coef = np.zeros((h.shape[0], n), np.float32)  # (T, rows)
        slots = pool.slot_of
        rows, neurons = np.nonzero(active & (slots >= 0)[None, :])
        coef[rows, slots[neurons]] = a[rows, neurons]
        x = h if isinstance(h, mx.array) else mx.array(np.asarray(h, np.float32))
        out = self._ffn(twin.raw[:n], x, mx.array(coef))
        if self.overlap:  # start the GPU now, while the host builds the next layer's graph
            mx.async_eval(out)
        return out

    def _ffn_fn(self, raw, x, coef):
        """raw (n, stride) bundles, x (T, K), coef (T, n) -> (T, D), on the device."""
        mx, lay = self.mx, self.layout
        up = decode_rows(mx, raw[:, : lay.up_bytes], lay.up_type, lay.d_model)  # (n, K)
        down = decode_rows(mx, raw[:, lay.up_bytes : lay.up_bytes + lay.down_bytes], Q.Q8_0,
                           lay.d_model)  # (n, D)
        return ((x @ up.T) * coef) @ down  # (T, n) -> (T, D)

    def report(self) -> dict:
        r = super().report()
        r.update({"h2d_bytes": self.stats["h2d_bytes"], "h2d_s": self.stats["h2d_s"],
                  "device_wait_s": self.stats["device_wait_s"]})
        return r
