"""The flash-resident FFN: pick the neurons a token needs, fetch the missing bundles, compute.

Per layer and call, with the gate's pre-activations g (T, ffn), exact, from its rows on flash or
held in DRAM (flash/gate.py):
  a = act(g); predicted contribution s = |a| * w   (w from calibration; see calibration.py)
  a neuron already in the pool is computed when s >= the threshold of `skip_fraction`; a cold
  one (not in DRAM) only when s >= the higher threshold of `cold_skip_fraction`: reading costs
  I/O, computing a resident one does not (cache-conditional routing)
Modes, for the benchmark's ablation (DESIGN "LLM in a flash"):
  "naive"  every call reads the layer's whole FFN section and computes every neuron
  "skip"   the skip rule; active bundles read each call, up row and down column as two reads
  "cache"  + the neuron pool with windowing (the last `window` tokens' neurons stay)
  "ours"   + one read per bundle, neighbouring bundles coalesced into large aligned reads,
           and (prefetch=True) layer-ahead reads: once layer L's gate is known, the next
           layer's active neurons are predicted from L's input (below) and the ones it does not
           hold are read in the background while L computes (flash/lookahead.py); layer L+1
           takes what it needs from that read and reads only the rest itself

The prediction (Deja Vu, ActiveFlow: adjacent layers see nearly the same residual stream): the
FFN input is h = x / rms(x) * w (w: the layer's ffn_norm); with x unchanged between layers,
layer L+1's input is ~ h_L * w_{L+1} / w_L, and L+1's own gate rows (read one layer ahead
anyway, flash/gate.py) give its predicted activations, through the same rule. On the 1.5B
(benchmarks/bench_offload.py --configs 0.75-prefetch) 92% of the bundles it read ahead were
used. Which neurons are computed never depends on it: only where their bytes come from.
"""

from __future__ import annotations

import time

import numpy as np

from ..cache.neuron_pool import NeuronPool, RawNeuronPool
from ..kernels.bundle_ffn import (
    RAW_UP_TYPES,
    bundle_ffn,
    bundle_ffn_rows,
    dequantize_raw,
    gather_rows,
)
from ..kernels.ops import ACTIVATIONS
from ..kernels.sparse_ffn import sparse_ffn
from ..loaders.direct_io import FlashReader, coalesce
from ..loaders.flash_format import DOWN_TYPE, FlashManifest
from ..options import FFN_MODES as MODES
from .gate import FlashGate
from .lookahead import Lookahead


class ReadBundles:
    """Bundles used where a read left them (the misses a full pool does not keep): buf holds
    neuron i's bundle at byte pos_of[i] (-1: not here)."""

    def __init__(self, buf: np.ndarray, neurons: np.ndarray, pos: np.ndarray, layout):
        self.buf, self.neurons = buf, neurons
        self.pos_of = np.full(layout.ffn_dim, -1, np.int64)
        self.pos_of[neurons] = pos


class FlashFFN:
    LOOKAHEAD = 1  # layers read ahead with prefetch=True (ring of LOOKAHEAD + 1 sections)
    PREDICT_ROWS = 16  # rows (a token and its drafts) up to which the next layer is predicted
    # raw bundles are computed where their read left them (no copy into a call's pool)
    READ_IN_PLACE = True

    def __init__(self, manifest: FlashManifest, activation: str, capacity: int,
                 skip_fraction: float = 0.3, window: int = 5, mode: str = "ours",
                 cold_skip_fraction: float | None = None, coalesce_gap: int = 4096,
                 threads: int = 8, direct: bool = True, prefetch: bool = False,
                 lookahead: int | None = None, compute_threads: int = 1,
                 gate_rows: int | None = None, gate_threads: int = 1):
        """capacity: neurons per layer pool; gate_rows: gate rows per layer held in DRAM
        (None: all; "naive" holds none)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        lay = manifest.layout
        self.manifest, self.layout, self.mode = manifest, lay, mode
        self.act = ACTIVATIONS[activation]
        self.window, self.gap = window, coalesce_gap
        self.compute_threads = max(1, compute_threads)
        n_layers = manifest.data["n_layers"]
        # w in bundle order: bundle j holds neuron order[j]
        self.weight = [np.asarray(manifest.layer(i)["weight"], np.float32)[
            np.asarray(manifest.layer(i)["order"], np.int64)] for i in range(n_layers)]
        held = 0 if mode == "naive" else lay.ffn_dim if gate_rows is None else gate_rows
        self.gate = FlashGate(manifest, held, threads=threads, direct=direct,
                              compute_threads=gate_threads)
        cold = skip_fraction if cold_skip_fraction is None else cold_skip_fraction
        self.threshold = self._thresholds(manifest, skip_fraction)
        self.cold_threshold = self._thresholds(manifest, max(cold, skip_fraction))
        self.skip_fraction, self.cold_skip_fraction = skip_fraction, max(cold, skip_fraction)
        cached = mode in ("cache", "ours")
        self.capacity = min(capacity, lay.ffn_dim) if cached else lay.ffn_dim
        self.pool_class = self.pool_type(lay)
        self.pools = ([self.pool_class(lay, self.capacity) for _ in range(n_layers)] if cached
                      else None)
        # the uncached modes' pool for one call (raw bundles are used where they were read)
        self.in_place = self.READ_IN_PLACE and self.pool_class is RawNeuronPool
        self.scratch = (None if cached or (mode == "naive" and self.in_place)
                        else self.pool_class(lay, lay.ffn_dim))
        self.reader = FlashReader(manifest.ffn_path, lay.section + 2 * 4096 * lay.ffn_dim
                                  if mode in ("skip", "cache") else lay.section,
                                  threads=threads, direct=direct)
        self.step = 0
        self.stats = {"io_s": 0.0, "mm_s": 0.0, "compute_s": 0.0, "neurons_needed": 0,
                      "neurons_hit": 0, "neurons_computed": 0, "neuron_slots": 0}
        # lookahead: a ring of staging slots and one background reader (flash/lookahead.py)
        self.prefetch = prefetch and mode == "ours"
        depth = self.LOOKAHEAD if lookahead is None else lookahead
        self.lookahead = (Lookahead(manifest.ffn_path, self.prefetch_slot(lay), depth,
                                    coalesce_gap, direct=direct, threads=threads)
                          if self.prefetch else None)
        self._ring_in_use = False  # the lookahead ring holds pages (released for prompts)
        self.norm_ratio = self._norm_ratios(manifest) if self.prefetch else None
        if cached:
            self._warm()

    @classmethod
    def prefetch_slot(cls, layout) -> int:
        """Staging bytes per predicted layer: half a section (a decoding token needs ~70% of
        a layer's neurons, minus what the pool holds, and not all are predicted; past it the
        hottest that fit are read ahead)."""
        return -(-(layout.section // 2) // 4096) * 4096

    @classmethod
    def prefetch_bytes(cls, layout) -> int:
        """What prefetch=True holds while decoding: the lookahead ring, and a layer's misses
        gathered out of the two read buffers (up to a section)."""
        return (cls.LOOKAHEAD + 1) * cls.prefetch_slot(layout) + layout.section

    @staticmethod
    def _norm_ratios(manifest) -> list[np.ndarray] | None:
        """w_{L+1} / w_L for each layer's ffn_norm (0 where w_L is ~0): the prediction's map
        from layer L's FFN input to layer L+1's; None where the norms are not found."""
        from ..loaders.gguf_file import GGUFFile

        f = GGUFFile(manifest.resident_path)
        try:
            w = [np.asarray(f.dense(f"blk.{i}.ffn_norm.weight"), np.float32).reshape(-1)
                 for i in range(manifest.data["n_layers"])]
        except KeyError:
            return None
        finally:
            f.close()
        out = []
        for a, b in zip(w[:-1], w[1:], strict=True):
            ok = np.abs(a) > 1e-6
            out.append(np.where(ok, b / np.where(ok, a, 1.0), 0.0).astype(np.float32))
        return out

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
    def pool_type(layout) -> type[NeuronPool]:
        """Raw bundles where the kernel decodes the row type, else decoded rows."""
        return RawNeuronPool if layout.up_type in RAW_UP_TYPES else NeuronPool

    @classmethod
    def bytes_per_neuron(cls, layout) -> int:
        """Pool bytes one neuron costs (decoded up row + scales + int8 down column)."""
        probe = cls.pool_type(layout)(layout, 1)
        return probe.nbytes - probe.slot_of.nbytes

    @classmethod
    def pool_fixed_bytes(cls, layout) -> int:
        """Pool bytes a layer costs whatever its capacity (where each neuron sits: 2 MB on the
        1.5B's 28 layers)."""
        return cls.pool_type(layout)(layout, 1).slot_of.nbytes

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
        la = self.lookahead
        for r in (self.reader, la.reader if la is not None else None):
            if r is not None:
                r.bytes_read = r.read_calls = 0
                r.seconds = 0.0
        for k in self.stats:
            self.stats[k] = 0 if isinstance(self.stats[k], int) else 0.0
        if la is not None:
            la.wait_s, la.bundles_read, la.bundles_used = 0.0, 0, 0
        self.gate.reset_counters()

    @property
    def ring_bytes(self) -> int:
        """What decoding with the lookahead holds (prefetch_bytes) and gives back while a
        prompt is read: counted once with a prompt chunk's arrays."""
        return self.prefetch_bytes(self.layout) if self.lookahead is not None else 0

    @property
    def nbytes(self) -> int:
        pools = self.pools if self.pools is not None else [self.scratch] if self.scratch else []
        la = self.lookahead.nbytes if self.lookahead is not None else 0
        return sum(p.nbytes for p in pools) + self.reader.nbytes + la + self.gate.nbytes

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

    def _read(self, layer: int, neurons: np.ndarray) -> np.ndarray:
        """Read bundles `neurons` (bundle indices, sorted) of a layer, neighbours coalesced;
        returns each one's byte position in the reader's staging buffer."""
        starts = self.manifest.layer(layer)["offset"] + neurons * self.layout.stride
        reads = coalesce(starts, starts + self.layout.stride, self.gap, self.reader.align)
        return self._landed(reads, self.reader.read(reads), starts)

    @staticmethod
    def _landed(reads, dests, starts) -> np.ndarray:
        """Where ranges starting at file offsets `starts` sit in a staging buffer that holds
        `reads` at `dests`: (n,) byte positions."""
        r_off = np.array([o for o, _ in reads], np.int64)
        idx = np.searchsorted(r_off, starts, side="right") - 1
        return np.asarray(dests, np.int64)[idx] + (starts - r_off[idx])

    def _gather(self, staging, reads, dests, starts) -> np.ndarray:
        """Bundles starting at file offsets `starts` out of a staging buffer that holds
        `reads` at `dests` -> (n, stride) uint8."""
        out = np.empty((len(starts), self.layout.stride), np.uint8)
        gather_rows(staging, self._landed(reads, dests, starts), self.layout.stride, out)
        return out

    # ---- lookahead ---------------------------------------------------------------------------
    def _active(self, layer: int, g: np.ndarray, pool) -> tuple[np.ndarray, np.ndarray]:
        """The skip rule on gate pre-activations g (T, ffn), in place: (activations (T, ffn),
        active (T, ffn) bool)."""
        a = self.act(g, out=np.empty_like(g))
        score = np.abs(a, out=g)  # in the gate's buffer: a prompt chunk's copies add up
        score *= self.weight[layer]
        th, th_cold = self.threshold[layer], self.cold_threshold[layer]
        if self.mode == "naive":
            return a, np.ones_like(score, dtype=bool)
        active = score >= th_cold
        if pool is not None and th < th_cold:  # a lower bar for neurons in DRAM
            active |= (score >= th) & (pool.slot_of >= 0)
        return a, active

    def _predict(self, layer: int, h: np.ndarray) -> None:
        """Queue the read of the bundles layer + 1 will probably need and does not hold,
        predicted from this layer's input h (module docstring)."""
        nxt = layer + 1
        if nxt >= len(self.pools) or self.norm_ratio is None or nxt in self.lookahead.pending:
            return
        pool = self.pools[nxt]
        _, active = self._active(nxt, self.gate.preact(nxt, h * self.norm_ratio[layer]), pool)
        want = np.nonzero(active.any(0))[0]
        want = want[pool.slot_of[want] < 0]  # a layer's pool changes only in its own call
        if len(want):
            starts = self.manifest.layer(nxt)["offset"] + want * self.layout.stride
            self.lookahead.submit(nxt, want, starts, self.layout.stride)

    def _take(self, layer: int, missing: np.ndarray, ahead) -> np.ndarray:
        """The bundles `missing` (sorted) as (n, stride) rows: from the layer-ahead read
        `ahead` (Lookahead.take) where it has them, the rest read now."""
        if ahead is None:
            return self._fetch(layer, missing)
        bundles, reads, dests = ahead
        have = np.isin(missing, bundles, assume_unique=True)
        out = np.empty((len(missing), self.layout.stride), np.uint8)
        if have.any():
            starts = self.manifest.layer(layer)["offset"] + missing[have] * self.layout.stride
            out[have] = self._gather(self.lookahead.reader.staging, reads, dests, starts)
        if not have.all():
            out[~have] = self._fetch(layer, missing[~have])
        self.lookahead.bundles_used += int(have.sum())
        return out

    ROW_BLOCK = 256  # prompt rows per pass through the FFN: bounds its (T, ffn) arrays

    def __call__(self, layer: int, h: np.ndarray) -> np.ndarray:
        """h (T, d) FFN input -> (T, d). A prompt chunk goes through in blocks of at most
        ROW_BLOCK rows (their (T, ffn) gate, activation and scores are 9 MB each at 256 rows on
        the 1.5B); each block reads its own bundles, so smaller blocks read more."""
        if h.shape[0] <= self.ROW_BLOCK:
            return self._rows(layer, h)
        if layer == 0:
            self.step += h.shape[0]  # the blocks share the chunk's step (windowing)
        return np.concatenate([self._rows(layer, h[s : s + self.ROW_BLOCK], count=False)
                               for s in range(0, h.shape[0], self.ROW_BLOCK)])

    def _rows(self, layer: int, h: np.ndarray, count: bool = True) -> np.ndarray:
        io0 = self.reader.seconds
        if layer == 0 and count:
            self.step += h.shape[0]
        pool = self.pools[layer] if self.pools is not None else None
        a, active = self._active(layer, self.gate.preact(layer, h), pool)  # bundle order
        needed = np.nonzero(active.any(0))[0]
        self.stats["neurons_needed"] += int(active.sum())
        if pool is not None:
            hit_slots = pool.slot_of[needed]
            # mark this step's resident neurons used first, so eviction cannot take them
            pool.last_used[hit_slots[hit_slots >= 0]] = self.step
            missing = needed[hit_slots < 0]
            self.stats["neurons_hit"] += int(active.sum()) - int(active[:, missing].sum())
            ahead = None
            if self.lookahead is not None:
                ahead = self.lookahead.take(layer)  # waits for it
                if h.shape[0] <= self.PREDICT_ROWS:
                    self._ring_in_use = True
                    self._predict(layer, h)
                elif self._ring_in_use:  # a prompt chunk: its arrays use the ring's memory
                    self.lookahead.release()
                    ahead, self._ring_in_use = None, False
            if len(missing) and self.in_place and self.lookahead is None:
                # no copies: the pool takes what fits straight from the read buffer, and the
                # rest (window full: the coldest misses) is computed where it landed. (With
                # the lookahead, bundles come from two buffers: they are gathered in bundle
                # order instead, so the sums run in the same order and results stay the same
                # bit for bit: the skip rule turns rounding differences into other neurons.)
                pos = self._read(layer, missing)
                t_mm = time.perf_counter()
                room = pool.evict_for(len(missing), self.step, self.window)
                gather_rows(self.reader.staging, pos[:room], self.layout.stride,
                            pool.reserve(missing[:room], self.step))
                tmp = ([ReadBundles(self.reader.staging, missing[room:], pos[room:],
                                    self.layout)] if room < len(missing) else [])
                self.stats["mm_s"] += time.perf_counter() - t_mm
            elif len(missing):
                raw = self._take(layer, missing, ahead)
                t_mm = time.perf_counter()
                room = pool.evict_for(len(missing), self.step, self.window)
                if room < len(missing):  # window full: the coldest misses are computed, not kept
                    keep, extra = missing[:room], missing[room:]
                    extra_pool = self.pool_class(self.layout, len(extra))
                    extra_pool.insert(extra, raw[room:], self.step)
                    tmp = [extra_pool]
                    raw = raw[:room]
                    missing = keep
                else:
                    tmp = []
                pool.insert(missing, raw, self.step)
                self.stats["mm_s"] += time.perf_counter() - t_mm
            else:
                tmp = []
            src = pool
        elif self.mode == "naive" and self.in_place:
            src, tmp = ReadBundles(self.reader.staging, needed, self._read(layer, needed),
                                   self.layout), []
        else:
            raw = self._fetch(layer, needed)
            t_mm = time.perf_counter()
            self.scratch.count = 0
            self.scratch.slot_of[:] = -1
            self.scratch.insert(needed, raw, self.step)
            self.stats["mm_s"] += time.perf_counter() - t_mm
            src, tmp = self.scratch, []
        t_c = time.perf_counter()
        out = self._compute(h, a, active, src)
        for part in tmp:  # neurons that did not fit the pool
            held = part.neurons if isinstance(part, ReadBundles) else part.neuron_of[: part.count]
            extra_active = np.zeros_like(active)
            extra_active[:, held] = active[:, held]
            out += self._compute(h, a, extra_active, part)
        self.stats["compute_s"] += time.perf_counter() - t_c
        self.stats["neurons_computed"] += int(active.sum())
        self.stats["neuron_slots"] += active.size
        self.stats["io_s"] += self.reader.seconds - io0
        return out

    def _compute(self, h, a, active, pool) -> np.ndarray:
        """The FFN over `active` (T, ffn) neurons held by pool: a neuron pool, or bundles
        where a read left them (ReadBundles)."""
        t = h.shape[0]
        raw, where = self._where(pool)
        if raw and 1 < t < self.DENSE_ROWS_RAW:
            # a verification pass: one walk over the union of its rows' neurons, each down
            # column decoded once for all rows
            union = np.nonzero(active.any(0) & (where >= 0))[0]
            coef = np.where(active[:, union], a[:, union], 0.0).astype(np.float32)  # (T, n)
            chunks = self.compute_threads if len(union) >= self.SPLIT_NEURONS else 1
            return bundle_ffn_rows(h, where[union], coef, self._bytes(pool), self.layout,
                                   chunks)
        if t >= (self.DENSE_ROWS_RAW if raw else self.DENSE_ROWS):
            return self._compute_rows_dense(h, a, active, pool)
        at = np.full((t, active.shape[1]), 0, np.int64)
        coef = np.zeros((t, active.shape[1]), np.float32)
        counts = np.zeros(t, np.int64)
        for r in range(t):
            idx = np.nonzero(active[r] & (where >= 0))[0]
            counts[r] = len(idx)
            at[r, : len(idx)] = where[idx]
            coef[r, : len(idx)] = a[r, idx]
        # one chunk per thread only when there is enough work to split. Not at SmolLM2's ~1,000
        # active neurons a row: on 2 cores two chunks halved the kernel in a microbenchmark
        # (1.4 -> 0.7 ms per call) but its measured time in the decoding pipeline rose
        # (share 0.25, alternating A/B: 37-46 vs 43-58 ms per token on a quiet machine)
        chunks = self.compute_threads if counts.sum() >= self.SPLIT_NEURONS else 1
        if raw:
            return bundle_ffn(h, at, coef, counts, self._bytes(pool), self.layout, chunks)
        return sparse_ffn(h.astype(np.float32), pool.block, at, coef, counts, pool, chunks)

    def _where(self, pool) -> tuple[bool, np.ndarray]:
        """Whether pool holds raw bundles, and where each neuron is in it, (ffn,) with -1 where
        absent: byte positions in self._bytes(pool) for raw bundles, slots in a decoded pool."""
        if isinstance(pool, ReadBundles):
            return True, pool.pos_of
        if isinstance(pool, RawNeuronPool):
            return True, np.where(pool.slot_of >= 0, pool.slot_of * self.layout.stride, -1)
        return False, pool.slot_of

    @staticmethod
    def _bytes(pool) -> np.ndarray:
        return pool.buf if isinstance(pool, ReadBundles) else pool.raw.reshape(-1)

    # from this many rows, dequantize the union and use BLAS (decoded pools; raw bundles,
    # whose multi-row kernel holds up longer: benchmarks/probe_ffn_kernels.py)
    DENSE_ROWS, DENSE_ROWS_RAW = 8, 32
    SPLIT_NEURONS = 2048  # active neurons in a call from which the kernel runs on every thread

    DENSE_NEURONS = 256  # neurons dequantized at a time on the prefill path

    def _compute_rows_dense(self, h, a, active, pool) -> np.ndarray:
        """Prefill: many rows share almost every neuron, so dequantize the union once and use
        BLAS (per-row sparse loops would redo the up-row dot products for every row). In
        groups of DENSE_NEURONS: the whole union at once (plus gguf's dequantizing
        temporaries) was a 34 MB peak on Gemma 3, past a 300 MB budget's reserve."""
        raw, where = self._where(pool)
        union = np.nonzero(active.any(0) & (where >= 0))[0]
        out = np.zeros((h.shape[0], self.layout.d_model), np.float32)
        x = h.astype(np.float32)
        lay = self.layout
        for g in range(0, len(union), self.DENSE_NEURONS):
            part = union[g : g + self.DENSE_NEURONS]
            if raw:  # the numba decoder: gguf's numpy one took ~0.1 s a layer on Q4_K
                rows = np.empty((len(part), lay.stride), np.uint8)
                gather_rows(self._bytes(pool), where[part], lay.stride, rows)
                up = dequantize_raw(rows[:, : lay.up_bytes], lay.up_type, lay.d_model)
                down = dequantize_raw(rows[:, lay.up_bytes : lay.up_bytes + lay.down_bytes],
                                      DOWN_TYPE, lay.d_model)
            else:
                up, down = pool.dequantize(where[part])  # (n, K), (n, D)
            coef = np.where(active[:, part], a[:, part], 0.0).astype(np.float32)  # (T, n)
            out += (coef * (x @ up.T)) @ down
        return out

    # ---- reporting -------------------------------------------------------------------------
    def report(self) -> dict:
        s = self.stats
        la = self.lookahead
        pre = la.reader if la is not None else None
        gate = self.gate.report()
        return {
            # every byte from flash: bundles, their lookahead, the gate rows not held
            "flash_bytes_read": self.reader.bytes_read + (pre.bytes_read if pre else 0)
            + gate["gate_bytes_read"],
            "flash_reads": self.reader.read_calls + (pre.read_calls if pre else 0)
            + gate["gate_reads"],
            **gate,
            "prefetch_bytes_read": pre.bytes_read if pre else 0,
            "prefetch_hit_rate": (la.bundles_used / la.bundles_read
                                  if la is not None and la.bundles_read else None),
            "prefetch_wait_s": la.wait_s if la is not None else 0.0,
            "prefetch_read_s": pre.seconds if pre else 0.0,
            "flash_read_mode": self.reader.mode,
            "neuron_cache_hit_rate": (s["neurons_hit"] / s["neurons_needed"]
                                      if self.pools is not None and s["neurons_needed"] else None),
            "ffn_active_fraction": (s["neurons_computed"] / s["neuron_slots"]
                                    if s["neuron_slots"] else None),
            "io_s": s["io_s"] + (la.wait_s if la is not None else 0.0) + gate["gate_wait_s"],
            "memory_management_s": s["mm_s"],
            "compute_s": s["compute_s"] + gate["gate_compute_s"],
            "pool_bytes": self.nbytes, "ffn_mode": self.mode,
            "skip_fraction": self.skip_fraction, "cold_skip_fraction": self.cold_skip_fraction,
        }

    def close(self) -> None:
        if self.lookahead is not None:
            self.lookahead.close()
        self.gate.close()
        self.reader.close()
