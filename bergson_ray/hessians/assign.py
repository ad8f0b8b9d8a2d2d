"""Which shard owns which module: balanced by eigendecomposition cost (d³).

Longest-processing-time greedy: modules sorted by cost, each to the currently
cheapest shard. Within 4/3 of optimal, deterministic, and since memory is d²
it balances memory about as well. A shard's modules keep the model's order.
"""

from __future__ import annotations

from collections.abc import Mapping


def assign_modules(costs: Mapping[str, float], num_shards: int) -> list[list[str]]:
    """Split module names over ``num_shards`` groups with near-equal total cost."""
    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    order = {name: i for i, name in enumerate(costs)}
    loads = [0.0] * num_shards
    groups: list[list[str]] = [[] for _ in range(num_shards)]
    for name in sorted(costs, key=lambda n: (-costs[n], order[n])):
        k = min(range(num_shards), key=lambda j: (loads[j], j))
        groups[k].append(name)
        loads[k] += float(costs[name])
    return [sorted(g, key=order.__getitem__) for g in groups]
