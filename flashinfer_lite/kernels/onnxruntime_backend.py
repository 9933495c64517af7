"""The compact CPU backend: GGUF blocks kept quantized, matmuls by ONNX Runtime's MatMulNBits.

Each GGUF tensor becomes MatMulNBits weights without requantizing (loaders/quant_grid.py): 4-bit
types stay 4-bit, 5/6/8-bit types become 8-bit, each with its original per-block scales. Types
with an additive minimum (Q4_1, Q5_1, Q4_K, Q5_K) add `block_sums(x) @ minimum.T`, a matmul
32x smaller than the weight. Weights are graph initializers (ORT prepacks them once; DESIGN.md:
1.5 ms for SmolLM2's 30 FFNs, vs 0.9 ms per matvec when fed as an input), and each layer's
projections that share an input run in one session call to keep per-call overhead down.
"""

from __future__ import annotations

import numpy as np

from ..loaders.gguf_file import GGUFFile, TensorInfo
from ..loaders.quant_grid import FLOAT_TYPES, QuantGrid, decode_grid
from .base import Backend, FeedForward, Linear

MS_DOMAIN = "com.microsoft"
OPSET = 17


def _ort():
    import onnxruntime

    return onnxruntime


def _pack(grid: QuantGrid) -> np.ndarray:
    """The integer grid in MatMulNBits' B layout: (N, K/block, block*bits/8) uint8."""
    n, k = grid.q.shape
    q = grid.q.reshape(n, k // grid.block, grid.block)  # (N, blocks, block)
    if grid.bits == 8:
        return np.ascontiguousarray(q)
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4))  # elem 2j low, 2j+1 high


class _GraphBuilder:
    """Accumulates nodes and initializers of one small ONNX graph."""

    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0
        self.nbytes = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, array: np.ndarray, prefix: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        self.nbytes += array.nbytes
        return name

    def op(self, op_type: str, inputs: list[str], domain: str | None = None, **attrs) -> str:
        from onnx import helper

        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], domain=domain, **attrs))
        return out

    def matmul(self, x: str, t: TensorInfo, f: GGUFFile) -> str:
        """x (T, K) times tensor t (N, K) transposed -> (T, N), weights kept compact."""
        n, k = t.shape
        if t.qtype in FLOAT_TYPES:
            return self.op("MatMul", [x, self.const(f.dense(t.name).T, "w")])
        grid = decode_grid(t.qtype, t.raw, (n, k))
        y = self.op(
            "MatMulNBits",
            [x, self.const(_pack(grid), "b"), self.const(grid.scale.reshape(-1), "s")],
            domain=MS_DOMAIN, K=k, N=n, bits=grid.bits, block_size=grid.block,
            accuracy_level=4,  # int8 activations, as llama.cpp's q8 dot products
        )
        if grid.minimum is None:
            return y
        nb = k // grid.block
        blocks = self.op("Reshape", [x, self.const(np.array([-1, nb, grid.block], np.int64))])
        sums = self.op("ReduceSum", [blocks, self.const(np.array([-1], np.int64))], keepdims=0)
        corr = self.op("MatMul", [sums, self.const(grid.minimum.T, "m")])  # (T, nb) @ (nb, N)
        return self.op("Add", [y, corr])

    def session(self, inputs: dict[str, int], outputs: list[str], threads: int):
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            self.nodes, "g",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, k])
             for n, k in inputs.items()],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            initializer=self.inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        )
        ort = _ort()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Between two session calls numpy runs attention on the same cores: spinning ORT
        # threads would steal them.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        self.nodes, self.inits = [], []  # the session owns the weights now
        return sess


class OrtLinear(Linear):
    def __init__(self, f: GGUFFile, names, biases, threads: int):
        g = _GraphBuilder()
        k = f.tensor(names[0]).shape[1]
        outs = []
        for name, b in zip(names, biases, strict=True):
            y = g.matmul("x", f.tensor(name), f)
            if b is not None:
                y = g.op("Add", [y, g.const(np.asarray(b, np.float32), "bias")])
            outs.append(g.op("Identity", [y]))
        self._nbytes = g.nbytes
        self.sess = g.session({"x": k}, outs, threads)
        self.outs = outs

    def __call__(self, x):
        return self.sess.run(self.outs, {"x": np.ascontiguousarray(x, np.float32)})

    @property
    def nbytes(self):
        return self._nbytes


class OrtFeedForward(FeedForward):
    def __init__(self, f: GGUFFile, gate, up, down, activation, threads):
        g = _GraphBuilder()
        k = f.tensor(gate).shape[1]
        gt, u = g.matmul("x", f.tensor(gate), f), g.matmul("x", f.tensor(up), f)
        if activation == "silu":
            act = g.op("Mul", [gt, g.op("Sigmoid", [gt])])
        else:  # gelu, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            c = lambda v: g.const(np.array(v, np.float32))  # noqa: E731
            cube = g.op("Mul", [g.op("Mul", [gt, gt]), gt])
            inner = g.op("Mul", [g.op("Add", [gt, g.op("Mul", [cube, c(0.044715)])]),
                                 c(np.sqrt(2 / np.pi))])
            act = g.op("Mul", [g.op("Mul", [gt, c(0.5)]), g.op("Add", [g.op("Tanh", [inner]),
                                                                      c(1.0)])])
        h = g.op("Mul", [act, u])
        y = g.op("Identity", [g.matmul(h, f.tensor(down), f)])
        self._nbytes = g.nbytes
        self.sess = g.session({"x": k}, [y], threads)
        self.out = [y]

    def __call__(self, x):
        return self.sess.run(self.out, {"x": np.ascontiguousarray(x, np.float32)})[0]

    @property
    def nbytes(self):
        return self._nbytes


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, threads: int):
        self.threads = threads

    def linear(self, f, names, biases=None):
        biases = list(biases) if biases is not None else [None] * len(names)
        return OrtLinear(f, list(names), biases, self.threads)

    def feed_forward(self, f, gate, up, down, activation):
        return OrtFeedForward(f, gate, up, down, activation, self.threads)
