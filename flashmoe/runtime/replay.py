"""Replay routing traces through the expert-cache eviction policies: hit rate against cache size.

Each trace (docs/formats.md, "Routing trace") becomes its stream of `(layer, expert)` lookups
(flashmoe.runtime.trace.lookup_keys), replayed by flashmoe.runtime.eviction.simulate_hit_rate for every policy the store
offers, at cache sizes given as fractions of all experts of the model (every MoE layer's). Belady's
optimal policy (`opt`: evict the entry whose next use is farthest away; Belady 1966) is replayed too: it
needs the future, so no cache can run it, but it bounds what any policy could reach on the trace.

A decode token visits the MoE layers in a fixed cycle (L layers x k experts per token), and a cache smaller
than that cycle is the textbook loop that defeats LRU, LFU and FIFO alike; the store's `lru-layer` (an
equal share per layer) is one answer, and `mru` (evict the most recently used entry, the classic answer to
a loop larger than the cache, which the store does not offer) is replayed beside it.

A trace of a model with random weights routes close to uniformly, the worst case for any cache; a trained
model's trace (`flashmoe generate --trace`) shows what real routing allows. Reports say which one a figure is.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Hashable, Sequence

from flashmoe.runtime.eviction import LRU, POLICIES, simulate_hit_rate
from flashmoe.runtime.trace import lookup_keys, read_trace

DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75)
OPT = "opt"
MRU = "mru"


class MostRecentlyUsed(LRU):
    """LRU's order with the opposite victim: the most recently used key."""

    def victim(self, can_evict, incoming: Hashable | None = None) -> Hashable | None:
        return next((k for k in reversed(self._order) if can_evict(k)), None)


def belady_hit_rate(keys: Sequence[Hashable], capacity: int) -> float:
    """Hit rate of Belady's optimal replacement on `keys` with `capacity` entries (0.0 for no lookups).

    On a miss with a full cache, the cached key whose next use is farthest in the future (or never) is
    evicted. O(n log n): a max-heap of (next use, key) with lazy deletion of stale entries.
    """
    n = len(keys)
    if n == 0:
        return 0.0
    next_use = [n] * n
    last: dict[Hashable, int] = {}
    for i in range(n - 1, -1, -1):
        next_use[i] = last.get(keys[i], n + i)  # never used again: beyond every real position, distinct
        last[keys[i]] = i
    cached: dict[Hashable, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, position of the lookup that set it)
    hits = 0
    for i, key in enumerate(keys):
        if key in cached:
            hits += 1
        elif capacity > 0 and len(cached) >= capacity:
            while True:
                neg_next, pos = heapq.heappop(heap)
                victim = keys[pos]
                if cached.get(victim) == -neg_next:
                    del cached[victim]
                    break
        if capacity > 0:
            cached[key] = next_use[i]
            heapq.heappush(heap, (-next_use[i], i))
    return hits / n


def _hit_rate(name: str, keys: list[tuple[int, int]], entries: int) -> float:
    if name == OPT:
        return belady_hit_rate(keys, entries)
    return simulate_hit_rate(keys, entries, MostRecentlyUsed() if name == MRU else name)


def replay(trace: str | Path, fractions: Sequence[float] = DEFAULT_FRACTIONS,
           policies: Sequence[str] | None = None) -> dict:
    """Hit rates of `trace` for each policy (default: every store policy, the candidates and 'opt') at each
    cache size.

    Returns {"trace", "model", "num_experts", "moe_layers", "experts_per_token", "tokens", "lookups",
    "distinct_experts", "sizes": [{"fraction", "entries", "hit_rate": {policy: rate}}]}; `entries` =
    round(fraction x num_experts x len(moe_layers)), at least 1.
    """
    header, tokens = read_trace(trace)
    keys = lookup_keys(header, tokens)
    total = header.num_experts * len(header.moe_layers)
    names = list(policies) if policies else [*POLICIES, MRU, OPT]
    sizes = []
    for fraction in fractions:
        entries = max(1, round(fraction * total))
        rates = {name: _hit_rate(name, keys, entries) for name in names}
        sizes.append({"fraction": fraction, "entries": entries, "hit_rate": rates})
    return {
        "trace": str(trace), "model": header.model, "num_experts": header.num_experts,
        "moe_layers": len(header.moe_layers), "experts_per_token": header.experts_per_token,
        "tokens": len(tokens), "lookups": len(keys), "distinct_experts": len(set(keys)), "sizes": sizes,
    }
