"""The flash-resident FFN: pick the neurons a token needs, fetch the missing bundles, compute.

Per layer and call, with the resident gate's pre-activations g (T, ffn):
  a = act(g); predicted contribution s = |a| * w   (w from calibration; see calibration.py)
  a neuron already in the pool is computed when s >= the threshold of `skip_fraction`; a cold
  one (not in DRAM) only when s >= the higher threshold of `cold_skip_fraction`: reading costs
  I/O, computing a resident one does not (cache-conditional routing)
Modes, for the benchmark's ablation (DESIGN "LLM in a flash"):
  "naive"  every call reads the layer's whole FFN section and computes every neuron
  "skip"   the skip rule; active bundles read each call, up row and down column as two reads
  "cache"  + the neuron pool with windowing (the last `window` tokens' neurons stay)
  "ours"   + one read per bundle, neighbouring bundles coalesced into large aligned reads,
           and prefetch: when a decoding token finishes layer L, the bundles layer L + 1
           needed at the previous token and no longer holds are read on a background thread
           while this token computes (consecutive tokens share most of their active neurons);
           the call for L + 1 takes what it needs from that read and reads only the rest
           (`prefetch=True`; off by default: on this 2-core machine it read 1.5x the bytes,
           28% of them unused, and waited on the background reads: 2.0 vs 4.0-6.0 tok/s)
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..cache.neuron_pool import NeuronPool, RawNeuronPool
from ..kernels.bundle_ffn import RAW_UP_TYPES, bundle_ffn, gather_rows
from ..kernels.ops import ACTIVATIONS
from ..kernels.sparse_ffn import sparse_ffn
from ..loaders.direct_io import FlashReader, coalesce
from ..loaders.flash_format import FlashManifest

MODES = ("naive", "skip", "cache", "ours")


class FlashFFN:
    def __init__(self, manifest: FlashManifest, activation: str, capacity: int,
                 skip_fraction: float = 0.3, window: int = 5, mode: str = "ours",
                 cold_skip_fraction: float | None = None, coalesce_gap: int = 4096,
                 threads: int = 8, direct: bool = True, prefetch: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        lay = manifest.layout
        self.manifest, self.layout, self.mode = manifest, lay, mode
        self.act = ACTIVATIONS[activation]
        self.window, self.gap = window, coalesce_gap
        n_layers = manifest.data["n_layers"]
        self.order = [np.asarray(manifest.layer(i)["order"], np.int64) for i in range(n_layers)]
        # w in bundle order: bundle j holds neuron order[j]
        self.weight = [np.asarray(manifest.layer(i)["weight"], np.float32)[self.order[i]]
                       for i in range(n_layers)]
        cold = skip_fraction if cold_skip_fraction is None else cold_skip_fraction
        self.threshold = self._thresholds(manifest, skip_fraction)
        self.cold_threshold = self._thresholds(manifest, max(cold, skip_fraction))
        self.skip_fraction, self.cold_skip_fraction = skip_fraction, max(cold, skip_fraction)
        cached = mode in ("cache", "ours")
        self.capacity = min(capacity, lay.ffn_dim) if cached else lay.ffn_dim
        self.pool_class = RawNeuronPool if lay.up_type in RAW_UP_TYPES else NeuronPool
        self.pools = ([self.pool_class(lay, self.capacity) for _ in range(n_layers)] if cached
                      else None)
        self.scratch = None if cached else self.pool_class(lay, lay.ffn_dim)
        self.reader = FlashReader(manifest.ffn_path, lay.section + 2 * 4096 * lay.ffn_dim
                                  if mode in ("skip", "cache") else lay.section,
                                  threads=threads, direct=direct)
        self.step = 0
        self.stats = {"io_s": 0.0, "mm_s": 0.0, "compute_s": 0.0, "neurons_needed": 0,
                      "neurons_hit": 0, "neurons_computed": 0, "neuron_slots": 0,
                      "prefetched": 0, "prefetch_used": 0, "prefetch_wait_s": 0.0}
        # prefetch: a second staging buffer and one background reader thread
        self.prefetch = prefetch and mode == "ours"
        self.pre_reader = (FlashReader(manifest.ffn_path, lay.section, threads=threads,
                                       direct=direct) if self.prefetch else None)
        self._bg = ThreadPoolExecutor(max_workers=1) if self.prefetch else None
        self._last_needed: list[np.ndarray | None] = [None] * n_layers
        self._stable: list[np.ndarray | None] = [None] * n_layers  # needed by the last two
        self._pending = None  # (layer, bundles, future of (reads, dests))
        if cached:
            self._warm()

    @staticmethod
    def _thresholds(manifest, fraction: float) -> list[float]:
        if fraction == 0:  # skip nothing: scores are >= 0
            return [-1.0] * manifest.data["n_layers"]
        key = f"{fraction:.1f}"
        if key not in manifest.layer(0)["thresholds"]:
            raise ValueError(f"skip fraction {fraction} was not calibrated "
                             f"(have {sorted(manifest.layer(0)['thresholds'])})")
        return [manifest.layer(i)["thresholds"][key] for i in range(manifest.data["n_layers"])]

    @staticmethod
    def bytes_per_neuron(layout) -> int:
        """Pool bytes one neuron costs (decoded up row + scales + int8 down column)."""
        cls = RawNeuronPool if layout.up_type in RAW_UP_TYPES else NeuronPool
        probe = cls(layout, 1)
        return probe.nbytes - probe.slot_of.nbytes

    # ---- setup -----------------------------------------------------------------------------
    def _warm(self) -> None:
        """Fill each pool with its hottest neurons: one sequential read per layer."""
        lay = self.layout
        n = self.capacity
        for i, pool in enumerate(self.pools):
            off = self.manifest.layer(i)["offset"]
            length = -(-(n * lay.stride) // 4096) * 4096
            self.reader.read([(off, length)])
            raw = self.reader.staging[: n * lay.stride].reshape(n, lay.stride)
            pool.insert(np.arange(n), raw, step=-(1 << 20))
        self.reset_counters()

    def reset_counters(self) -> None:
        for r in (self.reader, self.pre_reader):
            if r is not None:
                r.bytes_read = r.read_calls = 0
                r.seconds = 0.0
        for k in self.stats:
            self.stats[k] = 0 if isinstance(self.stats[k], int) else 0.0

    @property
    def nbytes(self) -> int:
        pools = self.pools if self.pools is not None else [self.scratch]
        pre = self.pre_reader.nbytes if self.pre_reader is not None else 0
        return sum(p.nbytes for p in pools) + self.reader.nbytes + pre

    # ---- per call ----------------------------------------------------------------------------
    def _fetch(self, layer: int, neurons: np.ndarray) -> np.ndarray:
        """Read bundles `neurons` (bundle indices, sorted) of a layer -> raw (n, stride)."""
        lay = self.layout
        base = self.manifest.layer(layer)["offset"]
        starts = base + neurons * lay.stride
        if self.mode == "naive":
            self.reader.read([(base, lay.section)])
            return self.reader.staging[: lay.ffn_dim * lay.stride].reshape(-1, lay.stride)[
                neurons]
        if self.mode == "ours":  # one bundle = one range; neighbours coalesced
            reads = coalesce(starts, starts + lay.stride, self.gap, self.reader.align)
            dests = self.reader.read(reads)
            return self._gather(self.reader.staging, reads, dests, starts)
        # unbundled: the up row and the down column are separate reads
        al = self.reader.align
        up = [(s // al * al, al * (-(-(s % al + lay.up_bytes) // al))) for s in starts]
        dn_start = starts + lay.up_bytes
        dn = [(s // al * al, al * (-(-(s % al + lay.down_bytes) // al))) for s in dn_start]
        dests = self.reader.read(up + dn)
        n = len(neurons)
        out = np.zeros((n, lay.stride), np.uint8)
        for j in range(n):
            a = dests[j] + int(starts[j] % al)
            out[j, : lay.up_bytes] = self.reader.staging[a : a + lay.up_bytes]
            b = dests[n + j] + int(dn_start[j] % al)
            out[j, lay.up_bytes : lay.up_bytes + lay.down_bytes] = \
                self.reader.staging[b : b + lay.down_bytes]
        return out

    def _gather(self, staging, reads, dests, starts) -> np.ndarray:
        """Bundles starting at file offsets `starts` out of a staging buffer that holds
        `reads` at `dests` -> (n, stride) uint8."""
        r_off = np.array([o for o, _ in reads], np.int64)
        r_dst = np.array(dests, np.int64)
        idx = np.searchsorted(r_off, starts, side="right") - 1
        pos = r_dst[idx] + (starts - r_off[idx])
        out = np.empty((len(starts), self.layout.stride), np.uint8)
        gather_rows(staging, pos.astype(np.int64), self.layout.stride, out)
        return out

    # ---- prefetch ---------------------------------------------------------------------------
    def _start_prefetch(self, layer: int) -> None:
        """Read, in the background, the bundles `layer` needed last time and no longer holds."""
        prev, pool = self._stable[layer], self.pools[layer]
        if prev is None:
            return
        want = prev[pool.slot_of[prev] < 0]
        if len(want) == 0:
            return
        lay = self.layout
        starts = self.manifest.layer(layer)["offset"] + want * lay.stride
        reads = coalesce(starts, starts + lay.stride, self.gap, self.pre_reader.align)
        fut = self._bg.submit(lambda: (reads, self.pre_reader.read(reads)))
        self._pending = (layer, want, fut)
        self.stats["prefetched"] += len(want)

    def _wait_prefetch(self):
        """Finish the outstanding prefetch (its staging buffer is ours again) and hand it over:
        (layer, bundles, (reads, dests)), or None."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        t0 = time.perf_counter()
        done = pending[2].result()
        self.stats["prefetch_wait_s"] += time.perf_counter() - t0
        return pending[0], pending[1], done

    def _take(self, layer: int, missing: np.ndarray) -> np.ndarray:
        """The bundles `missing` (sorted): from this layer's prefetch where it has them, the
        rest read now."""
        pending = self._wait_prefetch()
        if pending is None or pending[0] != layer:  # none, or stale (a new prompt started)
            return self._fetch(layer, missing)
        reads, dests = pending[2]
        have = np.isin(missing, pending[1], assume_unique=True)
        out = np.empty((len(missing), self.layout.stride), np.uint8)
        if have.any():
            starts = self.manifest.layer(layer)["offset"] + missing[have] * self.layout.stride
            out[have] = self._gather(self.pre_reader.staging, reads, dests, starts)
        if not have.all():
            out[~have] = self._fetch(layer, missing[~have])
        self.stats["prefetch_used"] += int(have.sum())
        return out

    def __call__(self, layer: int, h: np.ndarray, gate: np.ndarray) -> np.ndarray:
        """h (T, d) FFN input, gate (T, ffn) resident gate pre-activations -> (T, d)."""
        io0 = self.reader.seconds
        if layer == 0:
            self.step += h.shape[0]
        a = self.act(gate[:, self.order[layer]])  # (T, ffn) in bundle order
        score = np.abs(a) * self.weight[layer]
        th, th_cold = self.threshold[layer], self.cold_threshold[layer]
        pool = self.pools[layer] if self.pools is not None else None
        if self.mode == "naive":
            active = np.ones_like(score, dtype=bool)
        elif pool is not None:
            resident = pool.slot_of >= 0
            active = np.where(resident, score >= th, score >= th_cold)
        else:
            active = score >= th_cold
        needed = np.nonzero(active.any(0))[0]
        self.stats["neurons_needed"] += int(active.sum())
        if pool is not None:
            hit_slots = pool.slot_of[needed]
            # mark this step's resident neurons used first, so eviction cannot take them
            pool.last_used[hit_slots[hit_slots >= 0]] = self.step
            missing = needed[hit_slots < 0]
            self.stats["neurons_hit"] += int(active.sum()) - int(active[:, missing].sum())
            if self._pending is not None and (self._pending[0] != layer or not len(missing)):
                self._wait_prefetch()  # stale or not needed: only its buffer is wanted back
            if len(missing):
                raw = self._take(layer, missing)
                t_mm = time.perf_counter()
                room = pool.evict_for(len(missing), self.step, self.window)
                if room < len(missing):  # window full: the coldest misses are computed, not kept
                    keep, extra = missing[:room], missing[room:]
                    tmp = self.pool_class(self.layout, len(extra))
                    tmp.insert(extra, raw[room:], self.step)
                    raw = raw[:room]
                    missing = keep
                else:
                    tmp = None
                pool.insert(missing, raw, self.step)
                self.stats["mm_s"] += time.perf_counter() - t_mm
            else:
                tmp = None
            src = pool
        else:
            raw = self._fetch(layer, needed)
            t_mm = time.perf_counter()
            self.scratch.count = 0
            self.scratch.slot_of[:] = -1
            self.scratch.insert(needed, raw, self.step)
            self.stats["mm_s"] += time.perf_counter() - t_mm
            src, tmp = self.scratch, None
        t_c = time.perf_counter()
        out = self._compute(h, a, active, src)
        if tmp is not None:  # neurons that did not fit the pool
            extra_active = np.zeros_like(active)
            extra_active[:, tmp.neuron_of[: tmp.count]] = active[:, tmp.neuron_of[: tmp.count]]
            out += self._compute(h, a, extra_active, tmp)
        self.stats["compute_s"] += time.perf_counter() - t_c
        self.stats["neurons_computed"] += int(active.sum())
        self.stats["neuron_slots"] += active.size
        self.stats["io_s"] += self.reader.seconds - io0
        if self.prefetch and pool is not None:
            last = self._last_needed[layer]
            # neurons needed by both of the last two tokens: 70% of a single token's set were
            # needed again (measured), so prefetching it wasted 30% of its reads
            self._stable[layer] = (needed if last is None else
                                   np.intersect1d(last, needed, assume_unique=True))
            self._last_needed[layer] = needed
            if h.shape[0] == 1:  # decoding: the next layer's likely misses, while we compute
                self._start_prefetch((layer + 1) % len(self.pools))
        return out

    def _compute(self, h, a, active, pool) -> np.ndarray:
        t = h.shape[0]
        if t >= self.DENSE_ROWS:
            return self._compute_rows_dense(h, a, active, pool)
        slots = np.full((t, active.shape[1]), 0, np.int64)
        coef = np.zeros((t, active.shape[1]), np.float32)
        counts = np.zeros(t, np.int64)
        for r in range(t):
            idx = np.nonzero(active[r] & (pool.slot_of >= 0))[0]
            counts[r] = len(idx)
            slots[r, : len(idx)] = pool.slot_of[idx]
            coef[r, : len(idx)] = a[r, idx]
        if isinstance(pool, RawNeuronPool):
            return bundle_ffn(h, slots, coef, counts, pool)
        return sparse_ffn(h.astype(np.float32), pool.block, slots, coef, counts, pool)

    DENSE_ROWS = 8

    def _compute_rows_dense(self, h, a, active, pool) -> np.ndarray:
        """Prefill: many rows share almost every neuron, so dequantize the union once and use
        BLAS (per-row sparse loops would redo the up-row dot products for every row)."""
        union = np.nonzero(active.any(0) & (pool.slot_of >= 0))[0]
        if len(union) == 0:
            return np.zeros((h.shape[0], pool.d_out), np.float32)
        up, down = pool.dequantize(pool.slot_of[union])  # (n, K), (n, D)
        coef = np.where(active[:, union], a[:, union], 0.0).astype(np.float32)  # (T, n)
        return (coef * (h.astype(np.float32) @ up.T)) @ down

    # ---- reporting -------------------------------------------------------------------------
    def report(self) -> dict:
        s = self.stats
        pre = self.pre_reader
        return {
            "flash_bytes_read": self.reader.bytes_read + (pre.bytes_read if pre else 0),
            "flash_reads": self.reader.read_calls + (pre.read_calls if pre else 0),
            "prefetch_bytes_read": pre.bytes_read if pre else 0,
            "prefetch_hit_rate": (s["prefetch_used"] / s["prefetched"]
                                  if s["prefetched"] else None),
            "prefetch_wait_s": s["prefetch_wait_s"],
            "flash_read_mode": self.reader.mode,
            "neuron_cache_hit_rate": (s["neurons_hit"] / s["neurons_needed"]
                                      if self.pools is not None and s["neurons_needed"] else None),
            "ffn_active_fraction": (s["neurons_computed"] / s["neuron_slots"]
                                    if s["neuron_slots"] else None),
            "io_s": s["io_s"] + s["prefetch_wait_s"], "memory_management_s": s["mm_s"],
            "compute_s": s["compute_s"],
            "pool_bytes": self.nbytes, "ffn_mode": self.mode,
            "skip_fraction": self.skip_fraction, "cold_skip_fraction": self.cold_skip_fraction,
        }

    def close(self) -> None:
        self._wait_prefetch()
        if self._bg is not None:
            self._bg.shutdown(wait=True)
            self.pre_reader.close()
        self.reader.close()
