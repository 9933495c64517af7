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
