"""One memory budget, split among resident weights, the KV cache reserve, the read staging
buffer and the per-layer neuron pools.

The resident part (attention, head or preview head, gate predictor, norms, tokenizer) is built
first and measured in RSS (`Model.resident_rss_bytes`: ONNX Runtime holds about twice the
weight bytes it is given); what is left after the KV reserve and staging goes
to the pools, evenly per layer. A budget whose pools would hold fewer than MIN_POOL_SHARE of a
layer's neurons is refused with the minimum stated.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BudgetError
from ..memory import format_bytes

MIN_POOL_SHARE = 0.05
# Working memory of a running model beyond weights, pools and KV: ORT's activations for a
# prefill chunk, numpy temporaries, the sampler. Measured on SmolLM2 (benchmarks/
# bench_budget.py): the first generation adds ~11 MB of RSS besides its KV cache.
WORKING_BYTES = 16 << 20


@dataclass
class Plan:
    budget: int
    resident_bytes: int
    kv_reserve_bytes: int
    staging_bytes: int
    pool_bytes_per_neuron: int
    n_layers: int
    ffn_dim: int
    capacity: int  # neurons per layer pool

    @property
    def ffn_share(self) -> float:
        return self.capacity / self.ffn_dim

    def as_dict(self) -> dict:
        return {"budget": self.budget, "resident_bytes": self.resident_bytes,
                "kv_reserve_bytes": self.kv_reserve_bytes, "staging_bytes": self.staging_bytes,
                "pool_capacity": self.capacity, "ffn_share": self.ffn_share}


def plan(budget: int, resident_bytes: int, kv_reserve_bytes: int, kv_tokens: int,
         staging_bytes: int, pool_bytes_per_neuron: int, n_layers: int, ffn_dim: int) -> Plan:
    """kv_reserve_bytes: what the KV cache holds after kv_tokens positions."""
    kv = kv_reserve_bytes
    staging_bytes += WORKING_BYTES
    left = budget - resident_bytes - kv - staging_bytes
    capacity = min(ffn_dim, max(0, left // (pool_bytes_per_neuron * n_layers)))
    minimum = int(MIN_POOL_SHARE * ffn_dim)
    if capacity < minimum:
        need = (resident_bytes + kv + staging_bytes
                + minimum * pool_bytes_per_neuron * n_layers)
        raise BudgetError(
            f"memory budget {format_bytes(budget)} is too small for this model: the minimum is "
            f"{format_bytes(need)} (resident part {format_bytes(resident_bytes)} as measured in "
            f"RSS, KV cache "
            f"for {kv_tokens} tokens {format_bytes(kv)}, read buffers and working memory "
            f"{format_bytes(staging_bytes)}, {MIN_POOL_SHARE:.0%} of the FFN neurons)")
    return Plan(budget, resident_bytes, kv, staging_bytes, pool_bytes_per_neuron, n_layers,
                ffn_dim, int(capacity))
