"""Eviction policies for the direct-mode expert cache.

A policy only orders keys; the cache owns the buffers. The cache tells the policy when a key is inserted,
hit or removed, and asks it for a victim among the keys that may be evicted now (the cache pins entries
that the engine is still reading). Keys are `(layer, expert)` pairs but any hashable works.

Policies (select by name with `make_policy`):
- `lru`  least recently used (the default).
- `lfu`  least frequently used while resident; ties broken by least recent use.
- `fifo` first in, first out: hits do not refresh an entry.
Which one wins depends on the routing; issue 8 measures them on real and synthetic traces
(`simulate_hit_rate` replays a trace without any I/O).
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from typing import Callable, Hashable, Iterable, Protocol

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

    def victim(self, can_evict: Callable[[Key], bool]) -> Key | None:
        """The key to evict next among those for which `can_evict(key)` is true; None if there is none.
        Does not remove it (the cache calls `remove`)."""


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

    def victim(self, can_evict: Callable[[Key], bool]) -> Key | None:
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

    def victim(self, can_evict: Callable[[Key], bool]) -> Key | None:
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


POLICIES: dict[str, type] = {"lru": LRU, "lfu": LFU, "fifo": FIFO}


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy by name ('lru', 'lfu', 'fifo'); ValueError listing the names for any other."""
    try:
        return POLICIES[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICIES)}") from None


def simulate_hit_rate(keys: Iterable[Key], capacity: int, policy: str | EvictionPolicy = "lru") -> float:
    """Replay a stream of key lookups against a cache of `capacity` entries (no pinning) and return the
    fraction that hit. 0.0 for an empty stream. Used to compare policies on routing traces without I/O."""
    pol = make_policy(policy) if isinstance(policy, str) else policy
    cached: set[Key] = set()
    hits = lookups = 0
    for key in keys:
        lookups += 1
        if key in cached:
            hits += 1
            pol.touch(key)
            continue
        if capacity <= 0:
            continue
        if len(cached) >= capacity:
            old = pol.victim(lambda k: True)
            pol.remove(old)
            cached.discard(old)
        cached.add(key)
        pol.insert(key)
    return hits / lookups if lookups else 0.0
