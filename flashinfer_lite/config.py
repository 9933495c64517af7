"""A model's dimensions, read from GGUF metadata into one small dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InvalidModelFileError, UnsupportedModelError
from .loaders.gguf_file import GGUFFile

# GGUF architectures we run, and the RoPE layout llama.cpp uses for each: "norm" rotates adjacent
# pairs (the converter permuted Q/K into Meta's layout), "neox" rotates the two halves.
ROPE_TYPES = {"llama": "norm", "mistral": "norm", "qwen2": "neox", "qwen3": "neox",
              "gemma3": "neox"}
SUPPORTED_ARCHITECTURES = tuple(ROPE_TYPES)


@dataclass
class ModelConfig:
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_base: float
    rope_type: str  # "norm" | "neox"
    rope_scale: float = 1.0  # linear position scaling (positions divided by this)
    rope_base_local: float | None = None  # sliding-window layers' base, where it differs
    sliding_window: int | None = None
    global_layers: frozenset[int] = field(default_factory=frozenset)  # full-attention layers
    attn_scale: float = 0.0  # 0 -> 1/sqrt(head_dim)
    embed_scale: float = 1.0
    activation: str = "silu"  # "silu" | "gelu_tanh"
    name: str = ""

    def __post_init__(self):
        if not self.attn_scale:
            self.attn_scale = 1.0 / math.sqrt(self.head_dim)

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and layer not in self.global_layers

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> ModelConfig:
        arch = f.architecture
        if arch not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )

        def need(suffix):
            v = f.arch_key(suffix)
            if v is None:
                raise InvalidModelFileError(f"{f.path.name} lacks metadata key {arch}.{suffix}")
            return v

        d_model = int(need("embedding_length"))
        n_heads = int(need("attention.head_count"))
        n_kv = f.arch_key("attention.head_count_kv", n_heads)
        head_dim = int(f.arch_key("attention.key_length", d_model // n_heads))
        vocab = f.tensor("token_embd.weight").shape[0]
        kw = dict(
            architecture=arch,
            n_layers=int(need("block_count")),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            head_dim=head_dim,
            ffn_dim=int(need("feed_forward_length")),
            vocab_size=int(vocab),
            context_length=int(f.arch_key("context_length", 2048)),
            norm_eps=float(f.arch_key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(f.arch_key("rope.freq_base", 10000.0)),
            rope_type=ROPE_TYPES[arch],
            name=str(f.get("general.name", f.path.stem)),
        )
        scaling = f.arch_key("rope.scaling.type")
        factor = f.arch_key("rope.scaling.factor")
        if scaling == "linear" and factor:
            kw["rope_scale"] = float(factor)
        if arch == "gemma3":
            # Gemma 3: every 6th layer attends globally (RoPE base from metadata, 1e6); the others
            # slide over `sliding_window` tokens with RoPE base 1e4, which llama.cpp hard-codes.
            kw.update(
                sliding_window=int(f.arch_key("attention.sliding_window", 512)),
                global_layers=frozenset(i for i in range(kw["n_layers"]) if (i + 1) % 6 == 0),
                rope_base_local=10000.0,
                embed_scale=math.sqrt(d_model),
                activation="gelu_tanh",
                norm_eps=float(f.arch_key("attention.layer_norm_rms_epsilon", 1e-6)),
            )
        return cls(**kw)
