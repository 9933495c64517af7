"""A model's dimensions, read from GGUF metadata into one small dataclass: the keys every
architecture shares here, each architecture's own in its file (models/)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InvalidModelFileError, UnsupportedModelError
from .loaders.gguf_file import GGUFFile
from .models import ARCHITECTURES

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


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
        if arch not in ARCHITECTURES:
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
            rope_type=ARCHITECTURES[arch][1],
            name=str(f.get("general.name", f.path.stem)),
        )
        scaling = f.arch_key("rope.scaling.type")
        factor = f.arch_key("rope.scaling.factor")
        if scaling == "linear" and factor:
            kw["rope_scale"] = float(factor)
        return cls(**ARCHITECTURES[arch][0].config_fields(f, kw))
