"""llama.cpp (llama-cpp-python) as the reference engine that tests and benchmarks compare with.

One place builds it, because on CPUs with AMX (Intel Sapphire Rapids and later) llama.cpp moves
weights into AMX buffers at load and, in the builds pip makes here (llama-cpp-python 0.3.36),
the first evaluation then crashes the process in ggml_backend_amx_mul_mat (a machine-dependent
fault: ggml-org/llama.cpp#20824). Where the build reports AMX, the reference is loaded without
llama.cpp's extra buffer types: plain weights mapped from the file, no AMX and no repacking. Its
logits are the same computation; it is slower, so speed comparisons say which way it ran
(`extra_buffers`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .tokenizer import quiet_stderr


def build_has_amx() -> bool:
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def llama_cpp_model(path: Path | str, extra_buffers: bool | None = None, **kwargs):
    """A llama_cpp.Llama for path (verbose off, stderr quiet while loading). extra_buffers None:
    llama.cpp's default unless the build has AMX kernels (see the module docstring)."""
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    if extra_buffers is None:
        extra_buffers = not build_has_amx()
    kwargs.setdefault("verbose", False)
    defaults = lib.llama_model_default_params
    if not extra_buffers:
        # Llama() has no argument for it: it starts from the library's default parameters,
        # so those are what the load sees while this block runs.
        def without_extra_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = without_extra_buffers
    try:
        with quiet_stderr():
            llm = Llama(model_path=str(path), **kwargs)
    finally:
        lib.llama_model_default_params = defaults
    llm.extra_buffers = extra_buffers
    return llm


def first_position_logits(path: Path | str, token: int) -> np.ndarray:
    """Float64 logits (vocab,) of a one-token prompt for llama-style models without q/k norms
    (llama, qwen2), every weight dequantized by `gguf`, one layer at a time.

    At position 0 attention is exact without a softmax: the only key is the token itself, so
    each head's output is its KV head's value. This is the yardstick for a model's first
    position, where Qwen2.5's residual stream carries its very large activations (~3,000 by
    layer 2 in the 1.5B) and 8-bit activation quantization costs the most.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(str(path))
    tensors = {t.name: t for t in r.tensors}
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()

    def field(key):
        f = r.fields[f"{arch}.{key}"]
        return f.parts[f.data[0]][0]

    def weight(name):
        t = tensors[name]
        shape = [int(n) for n in reversed(t.shape)]  # gguf lists dims fastest first
        return np.asarray(dequantize(t.data, t.tensor_type), np.float64).reshape(shape)

    def bias(name):
        return weight(name) if name in tensors else 0.0

    eps = float(field("attention.layer_norm_rms_epsilon"))
    n_heads, n_kv = int(field("attention.head_count")), int(field("attention.head_count_kv"))

    def rms(x, name):
        return x / np.sqrt(np.mean(x * x) + eps) * weight(name)

    emb = tensors["token_embd.weight"]
    x = np.asarray(dequantize(emb.data[token : token + 1], emb.tensor_type), np.float64)
    x = x.reshape(-1)
    for i in range(int(field("block_count"))):
        p = f"blk.{i}."
        h = rms(x, p + "attn_norm.weight")
        v = weight(p + "attn_v.weight") @ h + bias(p + "attn_v.bias")  # (n_kv * head_dim,)
        heads = np.repeat(v.reshape(n_kv, -1), n_heads // n_kv, axis=0)  # (n_heads, head_dim)
        x = x + weight(p + "attn_output.weight") @ heads.reshape(-1) + bias(
            p + "attn_output.bias")
        h = rms(x, p + "ffn_norm.weight")
        g = weight(p + "ffn_gate.weight") @ h
        x = x + weight(p + "ffn_down.weight") @ (g / (1 + np.exp(-g)) * (
            weight(p + "ffn_up.weight") @ h))
    head = tensors["output.weight" if "output.weight" in tensors else "token_embd.weight"]
    h = rms(x, "output_norm.weight")
    rows = head.data.reshape(int(head.shape[1]), -1)  # (vocab, row bytes or elements)
    return np.concatenate([  # in slices: the whole head in float64 would be ~1-2 GB
        np.asarray(dequantize(rows[s : s + 16384], head.tensor_type), np.float64) @ h
        for s in range(0, len(rows), 16384)])
