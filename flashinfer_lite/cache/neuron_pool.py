"""A layer's neuron pool: FFN bundles held in DRAM, decoded for the sparse kernel.

Preallocated to `capacity` rows; inserting appends at `count`, deleting moves the last row into
the freed slot (so the live rows stay 0..count-1 and nothing is reallocated per token).
`slot_of[neuron]` and `neuron_of[slot]` keep the two directions; `last_used[slot]` drives
windowing (rows used by the last k tokens are never evicted), and eviction otherwise takes the
coldest rows (neurons are numbered hot-first in the flash file, so the largest id is coldest).
"""

from __future__ import annotations

import numpy as np
from gguf.quants import dequantize

from ..loaders.flash_format import DOWN_TYPE, BundleLayout
from ..loaders.quant_grid import BLOCK32, block32_fields, decode_grid


class NeuronPool:
    def __init__(self, layout: BundleLayout, capacity: int):
        self.layout, self.capacity = layout, capacity
        k, d = layout.d_model, layout.d_model
        probe = decode_grid(layout.up_type, np.zeros((1, layout.up_bytes), np.uint8), (1, k))
        self.bits, self.block, self.zero = probe.bits, probe.block, probe.zero
        width = k // 2 if self.bits == 4 else k
        nb = k // self.block
        self.up_q = np.zeros((capacity, width), np.uint8)
        self.up_s = np.zeros((capacity, nb), np.float32)
        self.up_m = np.zeros((capacity, nb), np.float32)
        self.dn_q = np.zeros((capacity, d), np.int8)
        self.dn_s = np.zeros((capacity, d // 32), np.float32)
        self.d_out = d
        self._init_slots()

    def _init_slots(self) -> None:
        """Empty slot maps: which neuron each slot holds, when each was used, where each
        neuron is."""
        self.neuron_of = np.full(self.capacity, -1, np.int64)
        self.last_used = np.full(self.capacity, -(1 << 30), np.int64)
        self.slot_of = np.full(self.layout.ffn_dim, -1, np.int64)
        self.count = 0

    def _arrays(self):
        return (self.up_q, self.up_s, self.up_m, self.dn_q, self.dn_s)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self._arrays(), self.neuron_of, self.last_used,
                                      self.slot_of))

    def decode_into(self, slots: np.ndarray, raw: np.ndarray) -> None:
        """Decode bundles raw (n, stride) uint8 into pool rows `slots`."""
        lay = self.layout
        n, k = raw.shape[0], lay.d_model
        grid = decode_grid(lay.up_type, raw[:, : lay.up_bytes], (n, k))
        q = grid.q
        self.up_q[slots] = (q[:, 0::2] | (q[:, 1::2] << 4)) if self.bits == 4 else q
        self.up_s[slots] = grid.scale
        self.up_m[slots] = 0.0 if grid.minimum is None else grid.minimum
        blocks = raw[:, lay.up_bytes : lay.up_bytes + lay.down_bytes].reshape(
            n, -1, BLOCK32[DOWN_TYPE].nbytes)  # (n, blocks, bytes)
        q, d, _ = block32_fields(np, blocks, DOWN_TYPE)
        self.dn_s[slots] = d[..., 0]
        self.dn_q[slots] = q.reshape(n, -1)

    def dequantize(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows `slots` as float32: up rows (n, K) and down columns (n, D)."""
        n = len(slots)
        q = self.up_q[slots]
        if self.bits == 4:  # (n, K/2) packed -> (n, K)
            q = np.stack([q & 15, q >> 4], axis=-1).reshape(n, -1)
        nb = self.up_s.shape[1]
        up = (q.astype(np.float32).reshape(n, nb, -1) - self.zero) * self.up_s[slots][..., None]
        up += self.up_m[slots][..., None]
        down = self.dn_q[slots].astype(np.float32).reshape(n, -1, 32) * self.dn_s[slots][..., None]
        return up.reshape(n, -1), down.reshape(n, -1)

    def insert(self, neurons: np.ndarray, raw: np.ndarray, step: int) -> np.ndarray:
        """Append neurons (with their bundles raw (n, stride)); returns their slots."""
        if len(neurons) == 0:
            return np.zeros(0, np.int64)
        slots = self._append(neurons, step)
        self.decode_into(slots, raw)
        return slots

    def _append(self, neurons: np.ndarray, step: int) -> np.ndarray:
        """Give neurons the next free slots (used at `step`); returns the slots."""
        n = len(neurons)
        if self.count + n > self.capacity:
            raise ValueError(f"pool full: {self.count} + {n} > {self.capacity}")
        slots = np.arange(self.count, self.count + n)
        self.neuron_of[slots] = neurons
        self.slot_of[neurons] = slots
        self.last_used[slots] = step
        self.count += n
        return slots

    def delete(self, slots: np.ndarray) -> None:
        """Remove rows; the holes are filled by moving rows from the end (swap-delete, done for
        all holes at once), so live rows stay 0..count-1."""
        victims = np.unique(np.asarray(slots, np.int64))
        n = len(victims)
        if n == 0:
            return
        new_count = self.count - n
        tail = np.arange(new_count, self.count)
        movers = tail[~np.isin(tail, victims)]  # live rows past the new end
        holes = victims[victims < new_count]  # as many as movers
        self.slot_of[self.neuron_of[victims]] = -1
        if len(holes):
            for a in (*self._arrays(), self.neuron_of, self.last_used):
                a[holes] = a[movers]
            self.slot_of[self.neuron_of[holes]] = holes
        self.neuron_of[tail] = -1
        self.last_used[tail] = -(1 << 30)
        self.count = new_count

    def evict_for(self, n: int, step: int, window: int) -> int:
        """Free up to n rows outside the window (coldest first); returns how many were freed."""
        free = self.capacity - self.count
        if free >= n:
            return n
        live = np.arange(self.count)
        old = live[self.last_used[: self.count] < step - window + 1]
        if len(old) == 0:
            return free
        need = min(n - free, len(old))
        coldest = old[np.argsort(-self.neuron_of[old], kind="stable")[:need]]
        self.delete(coldest)
        return free + need


class RawNeuronPool(NeuronPool):
    """A pool that keeps bundles exactly as on flash (see kernels/bundle_ffn.py): inserting is a
    copy, the kernel decodes as it goes, and a neuron costs its flash bytes of DRAM."""

    def __init__(self, layout: BundleLayout, capacity: int):
        self.layout, self.capacity = layout, capacity
        self.raw = np.zeros((capacity, layout.stride), np.uint8)
        self.d_out = layout.d_model
        self._init_slots()

    def _arrays(self):
        return (self.raw,)

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes + self.neuron_of.nbytes + self.last_used.nbytes + \
            self.slot_of.nbytes

    def decode_into(self, slots: np.ndarray, raw: np.ndarray) -> None:
        self.raw[slots] = raw

    def reserve(self, neurons: np.ndarray, step: int) -> np.ndarray:
        """Append neurons and return their rows (n, stride) for the caller to fill: a read
        buffer's bundles go straight in, with no intermediate copy."""
        first = self.count
        self._append(neurons, step)
        return self.raw[first : self.count]

    def dequantize(self, slots):
        lay, rows = self.layout, self.raw[slots]
        up = dequantize(rows[:, : lay.up_bytes], lay.up_type).reshape(len(slots), -1)
        down = dequantize(rows[:, lay.up_bytes : lay.up_bytes + lay.down_bytes], DOWN_TYPE)
        return up.astype(np.float32), down.reshape(len(slots), -1).astype(np.float32)
