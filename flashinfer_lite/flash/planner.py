"""One memory budget, split among resident weights, the KV cache reserve, the read staging
buffers, the gate rows held in DRAM and the per-layer neuron pools.

The resident part (attention, head or preview head, norms, tokenizer) is built first and
measured in RSS (`Model.resident_rss_bytes`); what is left after the KV reserve and staging
goes, evenly per layer, first to the minimum pools (MIN_POOL_SHARE of a layer's neurons, so the
window of recent neurons has room), then to the gate's rows (hot-first: a held gate row saves
its bytes on every token; flash/gate.py), then to the pools. A budget without room for the
minimum pools is refused with the minimum stated.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BudgetError
from ..memory import WORKING_BYTES, format_bytes

MIN_POOL_SHARE = 0.05
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
    gate_rows: int  # gate rows per layer held in DRAM
    transient_bytes: int = 0  # of staging_bytes: a prompt chunk's arrays, not buffers held

    @property
    def ffn_share(self) -> float:
        return self.capacity / self.ffn_dim

    def as_dict(self) -> dict:
        return {"budget": self.budget, "resident_bytes": self.resident_bytes,
                "kv_reserve_bytes": self.kv_reserve_bytes, "staging_bytes": self.staging_bytes,
                "pool_capacity": self.capacity, "ffn_share": self.ffn_share,
                "gate_rows_held": self.gate_rows, "gate_share": self.gate_rows / self.ffn_dim,
                "transient_bytes": self.transient_bytes}


def plan(budget: int, resident_bytes: int, kv_reserve_bytes: int, kv_tokens: int,
         staging_bytes: int, pool_bytes_per_neuron: int, n_layers: int, ffn_dim: int,
         gate_row_bytes: int) -> Plan:
    """kv_reserve_bytes: what the KV cache holds after kv_tokens positions."""
    kv = kv_reserve_bytes
    staging_bytes += WORKING_BYTES
    left = budget - resident_bytes - kv - staging_bytes
    minimum = int(MIN_POOL_SHARE * ffn_dim)
    per_neuron = pool_bytes_per_neuron * n_layers
    if left < minimum * per_neuron:
        need = (resident_bytes + kv + staging_bytes
                + minimum * pool_bytes_per_neuron * n_layers)
        raise BudgetError(
            f"memory budget {format_bytes(budget)} is too small for this model: the minimum is "
            f"{format_bytes(need)} (resident part {format_bytes(resident_bytes)} as measured in "
            f"RSS, KV cache "
            f"for {kv_tokens} tokens {format_bytes(kv)}, read buffers and working memory "
            f"{format_bytes(staging_bytes)}, {MIN_POOL_SHARE:.0%} of the FFN neurons)")
    left -= minimum * per_neuron
    gate_rows = min(ffn_dim, left // (gate_row_bytes * n_layers))
    left -= gate_rows * gate_row_bytes * n_layers
    capacity = minimum + min(ffn_dim - minimum, left // per_neuron)
    return Plan(budget, resident_bytes, kv, staging_bytes, pool_bytes_per_neuron, n_layers,
                ffn_dim, int(capacity), int(gate_rows))
