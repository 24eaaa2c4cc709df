"""Eviction policies for the direct-mode expert cache.

A policy only orders keys; the cache owns the buffers. The cache tells the policy when a key is inserted,
hit or removed, and asks it for a victim among the keys that may be evicted now (the cache pins entries
that the engine is still reading). Keys are `(layer, expert)` pairs but any hashable works.

Policies (select by name with `make_policy`):
- `lru-layer` LRU within an equal share of the capacity per MoE layer (keys must be `(layer, expert)`).
- `lru`  least recently used.
- `lfu`  least frequently used while resident; ties broken by least recent use.
- `fifo` first in, first out: hits do not refresh an entry.
- `lfu-layer` `lru-layer`'s shares, evicting within a layer by use counts that decay with a half-life
  (frequency-weighted LRU): the default (`DEFAULT_POLICY`).
Which one wins depends on the routing and the cache's size; docs/benchmarks.md measures them on real and
synthetic traces (`simulate_hit_rate` replays a trace without any I/O): the per-layer shares match or beat
LRU while the cache holds under a third of the experts, the regime flashmoe exists for, and trail it by a
few points above half; counting uses (`lfu-layer`) adds up to 4 points over `lru-layer` there.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from typing import Callable, Hashable, Protocol, Sequence

Key = Hashable


class EvictionPolicy(Protocol):
    """The interface the cache uses. All methods are O(1) or O(log n) amortised, except that `victim`
    skips over keys that `can_evict` refuses (at most the pinned ones)."""

    def insert(self, key: Key) -> None:
        """A key entered the cache (it must not be present)."""

    def touch(self, key: Key) -> None:
        """A cached key was hit."""

    def remove(self, key: Key) -> None:
        """A key left the cache (evicted by the cache, or dropped after a failed read)."""

    def victim(self, can_evict: Callable[[Key], bool], incoming: Key | None = None) -> Key | None:
        """The key to evict next, to make room for `incoming`, among those for which `can_evict(key)` is
        true; None if there is none. Does not remove it (the cache calls `remove`)."""


class LRU:
    """Least recently used: a hit moves the key to the back; the victim is the frontmost evictable."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def insert(self, key: Key) -> None:
        self._order[key] = None

    def touch(self, key: Key) -> None:
        self._order.move_to_end(key)

    def remove(self, key: Key) -> None:
        del self._order[key]

    def victim(self, can_evict: Callable[[Key], bool], incoming: Key | None = None) -> Key | None:
        return next((k for k in self._order if can_evict(k)), None)


class FIFO(LRU):
    """First in, first out: like LRU but a hit does not change the order."""

    def touch(self, key: Key) -> None:
        pass


class LFU:
    """Least frequently used since insertion; among equal counts, the least recently used.

    A min-heap of (count, last-use tick, key) with lazy deletion: every touch pushes a fresh entry, and
    stale ones (whose count/tick no longer match) are discarded when they surface. The heap is rebuilt
    when stale entries outnumber live ones 3 to 1, so memory stays O(n).
    """

    def __init__(self) -> None:
        self._state: dict[Key, tuple[int, int]] = {}
        self._heap: list[tuple[int, int, Key]] = []
        self._tick = itertools.count()

    def _push(self, key: Key, count: int) -> None:
        tick = next(self._tick)
        self._state[key] = (count, tick)
        # The tick is unique, so the key (which may not be orderable) is never compared.
        heapq.heappush(self._heap, (count, tick, key))
        if len(self._heap) > 4 * len(self._state) + 64:
            self._heap = [(c, t, k) for k, (c, t) in self._state.items()]
            heapq.heapify(self._heap)

    def insert(self, key: Key) -> None:
        self._push(key, 1)

    def touch(self, key: Key) -> None:
        self._push(key, self._state[key][0] + 1)

    def remove(self, key: Key) -> None:
        del self._state[key]

    def victim(self, can_evict: Callable[[Key], bool], incoming: Key | None = None) -> Key | None:
        skipped = []
        found = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            count, tick, key = entry
            if self._state.get(key) != (count, tick):
                continue  # stale
            skipped.append(entry)
            if can_evict(key):
                found = key
                break
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found


class LayerLRU:
    """LRU within an equal share of the capacity per MoE layer; keys are `(layer, expert)`.

    A decode token looks up its experts layer by layer in a fixed cycle of L x k lookups. A cache smaller
    than that cycle is a loop larger than the cache: plain LRU evicts every entry before its layer comes
    round again and hits nothing, while a share per layer keeps part of every layer's experts (measured in
    docs/benchmarks.md). The share is the capacity over the layers seen so far (all MoE layers after one
    token). A layer may use room the others leave free; once the cache is full, a miss evicts its own
    layer's least recently used entry if the layer holds its share, else the least recently used entry of
    the layer furthest above its share.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._orders: dict[Hashable, OrderedDict[Key, None]] = {}

    def insert(self, key: Key) -> None:
        self._orders.setdefault(key[0], OrderedDict())[key] = None

    def touch(self, key: Key) -> None:
        self._orders[key[0]].move_to_end(key)

    def remove(self, key: Key) -> None:
        del self._orders[key[0]][key]

    def victim(self, can_evict: Callable[[Key], bool], incoming: Key | None = None) -> Key | None:
        layers = len(self._orders) + (incoming is not None and incoming[0] not in self._orders)
        share = max(1, self._capacity // max(1, layers))
        own = self._orders.get(incoming[0]) if incoming is not None else None
        orders = sorted(self._orders.values(), key=len, reverse=True)
        if own is not None and len(own) >= share:
            orders.insert(0, own)  # its own first; others where all of its own are in use (a share under k)
        for order in orders:
            key = self._pick(order, can_evict)
            if key is not None:
                return key
        return None

    def _pick(self, order: OrderedDict[Key, None], can_evict: Callable[[Key], bool]) -> Key | None:
        """The victim within one layer's entries (least recently used first)."""
        return next((k for k in order if can_evict(k)), None)


class LayerLFU(LayerLRU):
    """`lru-layer`'s share per MoE layer, but the victim inside a layer is its least *frequently* used entry,
    counting uses with exponential decay (frequency-weighted LRU, as Flash-MoE's CUDA fork; an LFU that
    forgets): an entry's weight is the sum over its uses of 2^-(lookups since that use / half_life), so a
    burst long ago counts less than steady recent use; ties go to the least recently used. Keys are
    `(layer, expert)`; half_life is counted in lookups of the whole cache (default: its capacity).

    The weight is kept as (value, time of the last use) and brought up to date when compared, so a lookup is
    O(1) and a victim costs one pass over the chosen layer's entries (at most its experts)."""

    def __init__(self, capacity: int, half_life: float | None = None) -> None:
        super().__init__(capacity)
        self._half_life = float(half_life or max(capacity, 1))
        self._weight: dict[Key, tuple[float, int]] = {}
        self._now = 0

    def _use(self, key: Key, base: float) -> None:
        self._now += 1
        self._weight[key] = (base + 1.0, self._now)

    def _decayed(self, key: Key) -> float:
        value, when = self._weight[key]
        return value * 2.0 ** ((when - self._now) / self._half_life)

    def insert(self, key: Key) -> None:
        super().insert(key)
        self._use(key, 0.0)

    def touch(self, key: Key) -> None:
        super().touch(key)
        self._use(key, self._decayed(key))

    def remove(self, key: Key) -> None:
        super().remove(key)
        del self._weight[key]

    def _pick(self, order: OrderedDict[Key, None], can_evict: Callable[[Key], bool]) -> Key | None:
        # OrderedDict order is least recently used first, and min keeps the first of equal weights.
        return min((k for k in order if can_evict(k)), key=self._decayed, default=None)


#: The default: on the trained demo model's traces (525 tokens each) it beats lru-layer at every cache size from 5
#: to 30% of the experts (by 0.1-3.8 points) and LRU below half of them; near-uniform routing ties them
#: (docs/benchmarks.md, issue 15).
DEFAULT_POLICY = "lfu-layer"

# name -> factory(capacity in entries)
POLICIES: dict[str, Callable[[int], EvictionPolicy]] = {
    "lru": lambda capacity: LRU(),
    "lfu": lambda capacity: LFU(),
    "fifo": lambda capacity: FIFO(),
    "lru-layer": LayerLRU,
    "lfu-layer": LayerLFU,
}


def make_policy(name: str, capacity: int = 0) -> EvictionPolicy:
    """A fresh policy by name (see the module docstring) for a cache of `capacity` entries (only
    `lru-layer` uses it); ValueError listing the names for any other."""
    try:
        factory = POLICIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    return factory(capacity)


def simulate_hit_rate(keys: Sequence[Key], capacity: int, policy: str | EvictionPolicy = "lru") -> float:
    """Replay a stream of key lookups against a cache of `capacity` entries (no pinning) and return the
    fraction that hit. 0.0 for an empty stream. Used to compare policies on routing traces without I/O."""
    if isinstance(policy, str):
        policy = make_policy(policy, capacity)
    cached: set[Key] = set()
    hits = 0
    for key in keys:
        if key in cached:
            hits += 1
            policy.touch(key)
            continue
        if capacity <= 0:
            continue
        if len(cached) >= capacity:
            old = policy.victim(lambda k: True, key)
            policy.remove(old)
            cached.discard(old)
        cached.add(key)
        policy.insert(key)
    return hits / len(keys) if keys else 0.0
