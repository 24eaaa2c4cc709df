"""Routing traces (flashmoe/runtime/trace.py) and their replay through eviction policies (flashmoe/runtime/replay.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flashmoe.runtime.replay import MRU, OPT, MostRecentlyUsed, belady_hit_rate, replay
from flashmoe.errors import FormatError
from flashmoe.runtime.eviction import simulate_hit_rate
from flashmoe.runtime.trace import TraceHeader, TraceWriter, lookup_keys, read_trace

HEADER = TraceHeader(num_experts=8, experts_per_token=2, moe_layers=(1, 3), model="tiny")


def _write(path, rows):
    with TraceWriter(path, HEADER) as w:
        for experts, weights, prefill in rows:
            w.write(experts, weights, prefill=prefill)


def test_trace_round_trips_and_orders_lookups_by_token_then_layer(tmp_path):
    path = tmp_path / "t.jsonl"
    _write(path, [([[0, 5], [7, 2]], [[0.6, 0.4], [0.5, 0.5]], True), ([[5, 1], [2, 3]], None, False)])
    header, tokens = read_trace(path)
    assert header == HEADER
    assert [t.pos for t in tokens] == [0, 1] and tokens[0].prefill and not tokens[1].prefill
    np.testing.assert_array_equal(tokens[1].experts, [[5, 1], [2, 3]])
    np.testing.assert_allclose(tokens[0].weights, [[0.6, 0.4], [0.5, 0.5]])
    assert tokens[1].weights is None
    assert lookup_keys(header, tokens) == [(1, 0), (1, 5), (3, 7), (3, 2), (1, 5), (1, 1), (3, 2), (3, 3)]


@pytest.mark.parametrize("line, message", [
    ({"pos": 0, "experts": [[0, 1]]}, r"experts has shape \(1, 2\), expected \[2, k\]"),
    ({"pos": 0, "experts": [[0, 1], [2, 8]]}, "expert id outside 0..7"),
    ({"pos": 0, "experts": [[0, 1], [2, 3]], "weights": [[1.0], [1.0]]}, "weights shape"),
])
def test_malformed_trace_lines_are_reported_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(HEADER.to_dict()) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(FormatError, match=f"bad.jsonl:2: {message}"):
        read_trace(path)


def test_a_file_without_the_header_is_rejected(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"format": "something-else", "version": 1}\n')
    with pytest.raises(FormatError, match="x.jsonl:1: not a flashmoe-routing-trace version 1 header"):
        read_trace(path)


def _best_possible_hits(keys, capacity):
    """Exhaustive search over every eviction choice (tiny inputs only)."""
    best = 0

    def go(i, cached, hits):
        nonlocal best
        if i == len(keys):
            best = max(best, hits)
            return
        k = keys[i]
        if k in cached:
            go(i + 1, cached, hits + 1)
        elif len(cached) < capacity:
            go(i + 1, cached | {k}, hits)
        else:
            for victim in cached:
                go(i + 1, (cached - {victim}) | {k}, hits)

    go(0, frozenset(), 0)
    return best


def test_belady_is_optimal_on_small_streams():
    rng = np.random.default_rng(0)
    for _ in range(30):
        keys = [int(x) for x in rng.integers(0, 5, 10)]
        for capacity in (1, 2, 3):
            assert belady_hit_rate(keys, capacity) * len(keys) == pytest.approx(_best_possible_hits(keys, capacity))
            assert belady_hit_rate(keys, capacity) >= simulate_hit_rate(keys, capacity, "lru")


def test_replay_gives_every_policy_at_every_size(tmp_path):
    path = tmp_path / "t.jsonl"
    rng = np.random.default_rng(1)
    hot = [[0, 1], [0, 1]]  # a skewed trace: half the tokens route to the same two experts per layer
    rows = [(hot if t % 2 else rng.choice(8, (2, 2), replace=False).tolist(), None, False) for t in range(200)]
    _write(path, rows)
    r = replay(path, fractions=(0.25, 1.0))
    assert r["lookups"] == 200 * 2 * 2 and r["num_experts"] == 8 and r["moe_layers"] == 2
    assert [s["entries"] for s in r["sizes"]] == [4, 16]
    for s in r["sizes"]:
        assert set(s["hit_rate"]) == {"lru", "lfu", "fifo", "lru-layer", "lfu-layer", MRU, OPT}
        assert all(s["hit_rate"][OPT] >= v for v in s["hit_rate"].values())
    full = r["sizes"][1]["hit_rate"]
    assert full["lru"] == pytest.approx(1 - r["distinct_experts"] / r["lookups"])  # only compulsory misses
    assert r["sizes"][0]["hit_rate"]["lfu"] > 0.4  # LFU keeps the hot pair


def test_a_loop_larger_than_the_cache_defeats_lru_but_not_mru_or_a_per_layer_split():
    """Decode visits the layers in a fixed cycle; here 2 layers x 3 experts, repeated, with a cache of 4."""
    keys = [(layer, e) for _ in range(50) for layer in (0, 1) for e in (0, 1, 2)]
    assert simulate_hit_rate(keys, 4, "lru") == 0.0
    assert simulate_hit_rate(keys, 4, MostRecentlyUsed()) > 0.4
    assert simulate_hit_rate(keys, 4, "lru-layer") == 0.0  # 2 slots per layer still loop over 3 experts
    assert simulate_hit_rate(keys, 6, "lru-layer") == pytest.approx(1 - 6 / len(keys))
    assert belady_hit_rate(keys, 4) >= simulate_hit_rate(keys, 4, MostRecentlyUsed())


def test_lfu_layer_keeps_the_frequent_expert_and_forgets_an_old_burst():
    a, b, c = (0, 1), (0, 2), (0, 3)  # one layer, capacity 2
    # C must evict A or B: LRU drops A (used longer ago), lfu-layer drops B (used once), so A hits again.
    assert simulate_hit_rate([a, a, a, b, c, a], 2, "lru-layer") == pytest.approx(2 / 6)
    assert simulate_hit_rate([a, a, a, b, c, a], 2, "lfu-layer") == pytest.approx(3 / 6)
    # A burst of A, then B and C alternate: plain LFU keeps A forever (B and C always miss); decay forgets it.
    burst = [a] * 4 + [b, c] * 6
    assert simulate_hit_rate(burst, 2, "lfu") == pytest.approx(3 / 16)
    assert simulate_hit_rate(burst, 2, "lfu-layer") == pytest.approx(10 / 16)
