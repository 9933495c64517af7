"""The compact CPU backend: GGUF blocks kept quantized, matmuls by ONNX Runtime's MatMulNBits.

Each GGUF tensor becomes MatMulNBits weights without requantizing (loaders/quant_grid.py): 4-bit
types stay 4-bit, 5/6/8-bit types become 8-bit, each with its original per-block scales. Types
with an additive minimum (Q4_1, Q5_1, Q4_K, Q5_K) add `block_sums(x) @ minimum.T`, a matmul
32x smaller than the weight. Weights are graph initializers (ORT prepacks them once), and a
whole segment (models describe them; see kernels/base.py) runs as one session call.
"""

from __future__ import annotations

import mmap

import numpy as np
import onnxruntime as ort
import onnxruntime.capi._pybind_state as ort_state
from onnx import TensorProto, helper, numpy_helper

from ..loaders.gguf_file import GGUFFile
from ..loaders.quant_grid import FLOAT_TYPES, QuantGrid, decode_grid
from .base import Backend, GraphBuilder, Segment
from .ops import needs_mask, visible

MS_DOMAIN = "com.microsoft"
OPSET = 17


def _pack(grid: QuantGrid) -> np.ndarray:
    """The integer grid in MatMulNBits' B layout: (N, K/block, block*bits/8) uint8."""
    n, k = grid.q.shape
    q = grid.q.reshape(n, k // grid.block, grid.block)  # (N, blocks, block)
    if grid.bits == 8:
        return np.ascontiguousarray(q)
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4))  # elem 2j low, 2j+1 high


class _PackedInputs:
    """MatMulNBits' codes and scales handed to ORT as OrtValues over pages we own, dropped once
    ORT has prepacked them.

    ORT copies what it prepacks into its own layout (codes, scales and per-block sums in one
    buffer; on x86 the kernel reads only that buffer, mlas qnbitgemm.cpp), frees the codes it
    holds, but keeps the scales initializer (its PrePack says is_packed=false for them): every
    scale was held twice, 1 bit per 4-bit weight, 2 per Q6_K weight (the 1.5B: ~250 MB). Given
    through SessionOptions.add_initializer, OrtValues are used in place, never copied, and
    once the session exists their pages go back to the OS (MADV_DONTNEED keeps the mapping,
    so a pointer ORT holds stays valid). `drops_supported` checks once per process that this
    platform's kernel indeed computes from its packed copy alone.
    """

    def __init__(self):
        self.values: dict[str, ort.OrtValue] = {}
        self._specs: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self._maps: list[mmap.mmap] = []

    def add(self, name: str, array: np.ndarray) -> None:
        # private anonymous pages (a shared mapping would keep them after MADV_DONTNEED)
        buf = mmap.mmap(-1, max(array.nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        owned = np.frombuffer(buf, array.dtype, array.size).reshape(array.shape)
        owned[...] = array
        self._maps.append(buf)
        self.values[name] = ort.OrtValue.ortvalue_from_numpy(owned)
        self._specs[name] = (array.dtype, array.shape)

    def placeholders(self) -> list[TensorProto]:
        """The graph's initializers for these inputs: zeros of their type and shape (ORT wants
        an initializer to override, with data of the right size; `hand_to` overrides it)."""
        return [TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype),
                            dims=shape, raw_data=bytes(int(np.prod(shape)) * dtype.itemsize))
                for name, (dtype, shape) in self._specs.items()]

    def hand_to(self, opts: ort.SessionOptions) -> None:
        for name, value in self.values.items():
            opts.add_initializer(name, value)  # used in place: never copied

    def drop(self) -> None:
        """Return the pages to the OS; reading them afterwards gives zeros."""
        for buf in self._maps:
            buf.madvise(mmap.MADV_DONTNEED)


class _Tracer(GraphBuilder):
    """Records a segment as ONNX nodes; values are tensor names."""

    def __init__(self, f: GGUFFile, accuracy_level: int, packed: _PackedInputs | None = None):
        self.f, self.accuracy_level, self.packed = f, accuracy_level, packed
        self.nodes, self.inits, self._n, self.nbytes = [], [], 0, 0
        self._block_sums: dict[tuple[str, int], str] = {}

    def _name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, array: np.ndarray, prefix: str = "c") -> str:
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        self.nbytes += array.nbytes
        return name

    def kernel_input(self, array: np.ndarray, prefix: str) -> str:
        """A MatMulNBits weight input: an OrtValue dropped after prepacking where supported."""
        if self.packed is None:
            return self.const(array, prefix)
        name = self._name(prefix)
        self.packed.add(name, np.ascontiguousarray(array))
        self.nbytes += array.nbytes
        return name

    def op(self, op_type: str, inputs: list[str], domain: str | None = None, **attrs) -> str:
        out = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], domain=domain, **attrs))
        return out

    def _sums(self, x: str, nb: int, block: int) -> str:
        """Per-block sums of x (T, nb*block) -> (T, nb), shared by matmuls with the same x."""
        key = (x, block)
        if key not in self._block_sums:
            blocks = self.op("Reshape", [x, self.const(np.array([-1, nb, block], np.int64))])
            self._block_sums[key] = self.op("ReduceSum",
                                            [blocks, self.const(np.array([-1], np.int64))],
                                            keepdims=0)
        return self._block_sums[key]

    def linear(self, x, weight, bias=None, rows=None):
        t = self.f.tensor(weight)
        n, k = t.shape
        start, stop = rows if rows is not None else (0, n)
        if t.qtype in FLOAT_TYPES:
            w = self.f.dense(weight)[start:stop]
            y = self.op("MatMul", [x, self.const(w.T, "w")])
        else:
            y = self.linear_grid(x, decode_grid(t.qtype, t.raw[start:stop], (stop - start, k)))
        if bias is not None:
            y = self.op("Add", [y, self.const(self.f.dense(bias), "bias")])
        return y

    def linear_grid(self, x, grid: QuantGrid):
        """x (T, K) @ W.T for W a QuantGrid (N, K)."""
        n, k = grid.q.shape
        y = self.op(
            "MatMulNBits",
            [x, self.kernel_input(_pack(grid), "b"),
             self.kernel_input(grid.scale.reshape(-1), "s")],
            domain=MS_DOMAIN, K=k, N=n, bits=grid.bits, block_size=grid.block,
            accuracy_level=self.accuracy_level,
        )
        if grid.minimum is not None:
            sums = self._sums(x, k // grid.block, grid.block)
            y = self.op("Add", [y, self.op("MatMul", [sums, self.const(grid.minimum.T, "m")])])
        return y

    def linear_packed(self, x, grid):
        # codes, scales and zero points are already in MatMulNBits' layout (vocab/preview.py)
        return self.op(
            "MatMulNBits",
            [x, self.const(grid.codes, "b"), self.const(grid.scale.reshape(-1), "s"),
             self.const(grid.zero, "z")],
            domain=MS_DOMAIN, K=grid.k, N=grid.n, bits=grid.bits, block_size=grid.block,
            accuracy_level=self.accuracy_level,
        )

    def rms_norm(self, x, weight, eps):
        return self.op("SimplifiedLayerNormalization", [x, self.const(self.f.dense(weight), "n")],
                       axis=-1, epsilon=float(eps))

    def add(self, a, b):
        return self.op("Add", [a, b])

    def mul(self, a, b):
        return self.op("Mul", [a, b])

    def activation(self, x, kind):
        if kind == "silu":
            return self.op("Mul", [x, self.op("Sigmoid", [x])])
        if kind == "gelu_tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            c = lambda v: self.const(np.array(v, np.float32))  # noqa: E731
            cube = self.op("Mul", [self.op("Mul", [x, x]), x])
            inner = self.op("Mul", [self.op("Add", [x, self.op("Mul", [cube, c(0.044715)])]),
                                    c(np.sqrt(2 / np.pi))])
            one_plus = self.op("Add", [self.op("Tanh", [inner]), c(1.0)])
            return self.op("Mul", [self.op("Mul", [x, c(0.5)]), one_plus])
        raise ValueError(f"unknown activation {kind!r}")


# One pool for all ~30 sessions: per-session pools would each spin after a call and starve the
# next session and numpy on a 2-core machine (measured: 2 tok/s instead of 44). Arenas are off:
# each session would keep one sized for its largest prefill chunk (SmolLM2 after a 256-token
# prompt: 550 MB RSS with arenas, 273 MB without, same speed within noise).
_GLOBAL_POOL: dict[str, int | None] = {"threads": None}


def _use_global_pool(threads: int) -> bool:
    """Create ORT's process-wide thread pool once (it must precede the first session)."""
    if _GLOBAL_POOL["threads"] is None:
        try:
            ort_state.set_global_thread_pool_sizes(threads, 1)
            _GLOBAL_POOL["threads"] = threads
        except Exception:  # the environment exists already (another ORT user in-process)
            _GLOBAL_POOL["threads"] = 0
    return _GLOBAL_POOL["threads"] == threads


class OrtSegment(Segment):
    def __init__(self, f, fn, input_widths, threads: int, accuracy_level: int,
                 drop_packed: bool = False):
        """drop_packed: hand MatMulNBits' inputs as _PackedInputs and drop them once prepacked
        (only where `drops_supported` says the kernel then reads its packed copy alone)."""
        packed = _PackedInputs() if drop_packed else None
        tr = _Tracer(f, accuracy_level, packed)
        inputs = [f"in{i}" for i in range(len(input_widths))]
        outs = [tr.op("Identity", [o]) for o in fn(tr, *inputs)]
        graph = helper.make_graph(
            tr.nodes, "segment",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, w])
             for n, w in zip(inputs, input_widths, strict=True)],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
            initializer=tr.inits + ([] if packed is None else packed.placeholders()),
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET),
                                  helper.make_opsetid(MS_DOMAIN, 1)])
        opts = _session_options(threads)
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if packed is not None:
            packed.hand_to(opts)
        blob = model.SerializeToString()
        tr.nodes, tr.inits, graph, model = [], [], None, None  # the session owns the weights
        self.sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
        if packed is not None:
            packed.drop()
        self._packed = packed  # the dropped mappings stay mapped while the session lives
        # The Python wrapper keeps the serialized model (weights included) only to rebuild the
        # session on a provider fallback, which a CPU-only session never does: drop it, or every
        # weight is held twice (measured: Gemma 3's head 435 MB of RSS instead of 243 MB).
        self.sess._model_bytes = None
        self.inputs, self.outs, self._nbytes = inputs, outs, tr.nbytes
        self.input_widths = list(input_widths)

    def __call__(self, *arrays):
        feed = {n: np.ascontiguousarray(a, np.float32)
                for n, a in zip(self.inputs, arrays, strict=True)}
        return self.sess.run(self.outs, feed)

    @property
    def nbytes(self):
        return self._nbytes


_DROPS: dict[int, bool] = {}  # accuracy_level -> whether dropped inputs leave outputs unchanged


def drops_supported(threads: int, accuracy_level: int) -> bool:
    """Whether MatMulNBits computes from its prepacked copy alone here, so that _PackedInputs
    may be dropped: checked once per process on a small 4-bit and 8-bit matmul (one row and
    several, enough for MLAS's threaded path) against the same graph with its inputs kept."""
    if accuracy_level not in _DROPS:
        rng = np.random.default_rng(0)
        k, n = 512, 256
        grids = [QuantGrid(bits, block, rng.integers(0, 1 << bits, (n, k), dtype=np.uint8),
                           rng.uniform(0.5, 1.5, (n, k // block)).astype(np.float32), None)
                 for bits, block in ((4, 32), (8, 16))]
        x = rng.standard_normal((64, k)).astype(np.float32)

        def outputs(drop: bool):
            seg = OrtSegment(None, lambda g, h: [g.linear_grid(h, gr) for gr in grids], [k],
                             threads, accuracy_level, drop_packed=drop)
            return seg(x[:1]) + seg(x)

        _DROPS[accuracy_level] = all(
            np.array_equal(a, b) for a, b in zip(outputs(False), outputs(True), strict=True))
    return _DROPS[accuracy_level]


def _session_options(threads: int):
    opts = ort.SessionOptions()
    if _use_global_pool(threads):
        opts.use_per_session_threads = False
    else:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    return opts


class _AttentionGraphs:
    """ORT sessions for attention over a float16/float32 cache, shared by DecodeAttention and
    FewQueryAttention: one graph, with or without an additive mask, per cache dtype.

    q (Hkv, R, D) float32, already scaled, rows ordered (group, query); k, v (S, Hkv, D) as
    the cache holds them; mask (R, S): 0 where visible, -inf elsewhere -> o (Hkv, R, D).
    Cast, scores, [mask], Softmax, values in one call: ORT's Cast is vectorized (numpy
    converts float16 one element at a time, ~2.5 ns each here) and it runs on ORT's own pool.
    """

    def __init__(self, threads: int):
        self.threads = threads
        self._sessions = {}

    def session(self, dtype, masked: bool):
        key = (np.dtype(dtype).str, masked)
        if key in self._sessions:
            return self._sessions[key]
        elem = TensorProto.FLOAT16 if np.dtype(dtype) == np.float16 else TensorProto.FLOAT
        n = helper.make_node
        nodes = [
            n("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
            n("Cast", ["v"], ["vf"], to=TensorProto.FLOAT),
            n("Transpose", ["kf"], ["kt"], perm=[1, 2, 0]),  # (S, Hkv, D) -> (Hkv, D, S)
            n("Transpose", ["vf"], ["vt"], perm=[1, 0, 2]),  # (S, Hkv, D) -> (Hkv, S, D)
            n("MatMul", ["q", "kt"], ["s"]),  # (Hkv, R, D) @ (Hkv, D, S) -> (Hkv, R, S)
            n("Softmax", ["sm" if masked else "s"], ["p"], axis=-1),
            n("MatMul", ["p", "vt"], ["o"]),  # (Hkv, R, S) @ (Hkv, S, D) -> (Hkv, R, D)
        ]
        vi = helper.make_tensor_value_info
        inputs = [vi("q", TensorProto.FLOAT, [None, None, None]),
                  vi("k", elem, [None, None, None]), vi("v", elem, [None, None, None])]
        if masked:
            nodes.insert(5, n("Add", ["s", "mask"], ["sm"]))  # (Hkv, R, S) + (R, S)
            inputs.append(vi("mask", TensorProto.FLOAT, [None, None]))
        graph = helper.make_graph(nodes, "attention", inputs, [vi("o", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        sess = ort.InferenceSession(model.SerializeToString(), _session_options(self.threads),
                                    providers=["CPUExecutionProvider"])
        self._sessions[key] = sess
        return sess


class DecodeAttention:
    """One query position against a whole float16/float32 cache, in ORT (no mask: it sees
    every held key). Against numpy's element-wise float16 conversion: 78 vs 254 us at 320
    cached positions, 395 vs 1537 us at 2048 (SmolLM2 heads)."""

    def __init__(self, graphs: _AttentionGraphs):
        self.graphs = graphs

    def __call__(self, q, k, v, scale):
        _, h, d = q.shape
        hkv = k.shape[1]
        qg = q.reshape(hkv, h // hkv, d) * np.float32(scale)  # (1, H, D) -> (Hkv, G, D)
        out = self.graphs.session(k.dtype, masked=False).run(["o"], {
            "q": qg, "k": np.ascontiguousarray(k), "v": np.ascontiguousarray(v)})[0]
        return out.reshape(1, h * d)


class FewQueryAttention:
    """A few queries (T <= MAX_T: a chat turn's new tokens, the end of a prompt) against a whole
    float16/float32 cache, in ORT, as one graph with an additive causal mask. It runs on ORT's
    own pool: both cores, vectorized casts and exp, and no fight with ORT's spinning threads
    (kernels/prefill_attention's numba + one-thread BLAS path, which stays for long chunks,
    leaves the second core to spin).

    Measured (SmolLM2 heads, 19 queries over 2,000 float16 positions, 2 shared cores): ~2 ms
    per layer against ~3.5-4 ms block by block. The scores (Hkv, G*T, S) float32 exist whole,
    so the size is capped (MAX_SCORES); past it the caller goes block by block.
    """

    MAX_T = 64
    MAX_SCORES = 1 << 22  # T * H * S: 16 MB of float32 scores (and as much for their softmax)

    def __init__(self, graphs: _AttentionGraphs):
        self.graphs = graphs

    def takes(self, t: int, n_heads: int, s: int) -> bool:
        return 1 < t <= self.MAX_T and t * n_heads * s <= self.MAX_SCORES

    def __call__(self, q, k, v, q_pos, k_pos, scale, window):
        t, h, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        qg = q.reshape(t, hkv, g, d).transpose(1, 2, 0, 3).reshape(hkv, g * t, d)
        qg = np.ascontiguousarray(qg * np.float32(scale))  # rows ordered (group, query)
        # (T, S); every query sees itself
        mask = np.where(visible(q_pos, k_pos, window), np.float32(0), np.float32(-np.inf))
        out = self.graphs.session(k.dtype, masked=True).run(["o"], {
            "q": qg, "k": np.ascontiguousarray(k), "v": np.ascontiguousarray(v),
            "mask": np.tile(mask, (g, 1))})[0]
        return out.reshape(hkv, g, t, d).transpose(2, 0, 1, 3).reshape(t, h * d)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, threads: int, accuracy_level: int = 4):
        # accuracy_level 4: int8 activations, as in llama.cpp's q8 dot products (3.5x faster
        # than float here); 0 computes in float32 (used by tests to check the weight layout).
        self.threads, self.accuracy_level = threads, accuracy_level
        graphs = _AttentionGraphs(threads)
        self._decode_attention = DecodeAttention(graphs)
        self._few_query_attention = FewQueryAttention(graphs)

    def warm(self) -> None:
        """Create ONNX Runtime's process-wide state now (its environment, kernel registries,
        thread pool: ~41 MB of RSS, measured, once per process whatever the model) with a
        trivial session, so that what a model then adds is the model's own."""
        self.compile(None, lambda g, x: [g.add(x, x)], [1])(np.zeros((1, 1), np.float32))

    def attention(self, q, k, v, q_pos, k_pos, scale, window=None):
        if needs_mask(q_pos, k_pos, window):  # prefill: numpy, conversion amortized over T
            return super().attention(q, k, v, q_pos, k_pos, scale, window)
        return self._decode_attention(q, k, v, scale)

    def takes_few_queries(self, t, n_heads, s):
        return self._few_query_attention.takes(t, n_heads, s)

    def few_query_attention(self, q, k, v, q_pos, k_pos, scale, window=None):
        if not self.takes_few_queries(len(q_pos), q.shape[1], len(k_pos)):
            return None
        return self._few_query_attention(q, k, v, q_pos, k_pos, scale, window)

    def compile(self, f, fn, input_widths):
        return OrtSegment(f, fn, list(input_widths), self.threads, self.accuracy_level,
                          drop_packed=drops_supported(self.threads, self.accuracy_level))
