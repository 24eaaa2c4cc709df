"""ExpertStore: bytes, alignment, concurrency, caching and eviction, statistics, errors."""

from __future__ import annotations

import errno
import json
import mmap
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flashmoe.errors import FormatError
from flashmoe.format.manifest import ALIGN
from flashmoe.runtime.eviction import simulate_hit_rate
from flashmoe.runtime.stats import Stats
from flashmoe.runtime.store import ExpertStore

NUM_EXPERTS = 8
STRIDE = 3 * ALIGN
NBYTES = 2 * ALIGN + 1000  # not a multiple of 4096: direct reads round up to SLOT
SLOT = 3 * ALIGN


def write_layer(path: Path, data: np.ndarray) -> Path:
    """Write and fsync, so POSIX_FADV_DONTNEED can drop the (clean) pages."""
    with open(path, "wb") as f:
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
    return path


@pytest.fixture
def layers(tmp_path: Path) -> tuple[dict[int, Path], dict[int, np.ndarray]]:
    """Two MoE layers (1 and 3) of random bytes; the last expert ends the file without padding."""
    rng = np.random.default_rng(0)
    files, data = {}, {}
    for layer in (1, 3):
        data[layer] = rng.integers(0, 256, (NUM_EXPERTS - 1) * STRIDE + NBYTES, dtype=np.uint8)
        files[layer] = write_layer(tmp_path / f"layer_{layer:03d}.bin", data[layer])
    return files, data


def expert_bytes(data: dict[int, np.ndarray], layer: int, e: int) -> np.ndarray:
    return data[layer][e * STRIDE : e * STRIDE + NBYTES]


def make_store(files, mode="pagecache", **kw) -> ExpertStore:
    return ExpertStore(files, NUM_EXPERTS, STRIDE, NBYTES, mode=mode, **kw)


@pytest.mark.parametrize("mode,cache_bytes", [("pagecache", 0), ("direct", 0), ("direct", 4 * SLOT)])
def test_fetched_bytes_equal_file_slices_and_buffers_are_page_aligned(layers, mode, cache_bytes):
    files, data = layers
    with make_store(files, mode, cache_bytes=cache_bytes, threads=4) as store:
        for layer, ids in [(1, [0, 7, 3]), (3, [5, 5, 2]), (1, np.array([7, 6])), (3, [7, 0, 1, 2, 3, 4])]:
            f = store.fetch(layer, ids)
            bufs = store.wait(f)
            assert len(bufs) == len(ids)
            for e, buf in zip(ids, bufs):
                assert buf.dtype == np.uint8 and buf.shape == (NBYTES,)
                assert buf.ctypes.data % ALIGN == 0
                assert not buf.flags.writeable
                np.testing.assert_array_equal(buf, expert_bytes(data, layer, e))
            store.release(f)


def test_direct_mode_uses_o_direct_on_the_real_disk(layers):
    files, _ = layers
    with make_store(files, "direct") as store:
        assert store.direct is True


def test_all_reads_of_a_fetch_are_in_flight_together_and_fetch_returns_at_once(layers, monkeypatch):
    files, data = layers
    k, delay = 4, 0.2
    lock, in_flight, peak = threading.Lock(), [0], [0]
    real_preadv = os.preadv

    def slow_preadv(fd, buffers, offset, flags=0):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(delay)
        try:
            return real_preadv(fd, buffers, offset, flags)
        finally:
            with lock:
                in_flight[0] -= 1

    with make_store(files, threads=k) as store:
        monkeypatch.setattr(os, "preadv", slow_preadv)
        t0 = time.perf_counter()
        f = store.fetch(1, [0, 1, 2, 3])
        assert time.perf_counter() - t0 < delay / 2
        bufs = store.wait(f)
        elapsed = time.perf_counter() - t0
    assert peak[0] == k
    assert elapsed < 2 * delay  # concurrent, not k * delay
    assert store.stats.totals.io_wait_s > delay / 2
    for e, buf in enumerate(bufs):
        np.testing.assert_array_equal(buf, expert_bytes(data, 1, e))


@pytest.mark.parametrize("mode,cache_bytes", [("pagecache", 0), ("direct", 4 * SLOT)])
def test_as_read_yields_each_expert_as_its_read_lands_those_in_memory_first(layers, monkeypatch, mode, cache_bytes):
    """ExpertStore.as_read (a GPU copies each expert while the others are still read): an expert in memory at
    once, the others in the order their reads finish, each as wait would return it; the time blocked is I/O
    wait, and wait() after the iteration returns at once."""
    files, data = layers
    delay = 0.5
    real_preadv = os.preadv

    def slow_preadv(fd, buffers, offset, flags=0):
        if offset == 2 * STRIDE:  # expert 2 lands last
            time.sleep(delay)
        return real_preadv(fd, buffers, offset, flags)

    with make_store(files, mode, cache_bytes=cache_bytes, threads=4) as store:
        if cache_bytes:
            first = store.fetch(1, [5])
            store.wait(first)
            store.release(first)
        monkeypatch.setattr(os, "preadv", slow_preadv)
        t0 = time.perf_counter()
        f = store.fetch(1, [2, 0, 5])
        got = []
        for e, buf in store.as_read(f):
            got.append((e, time.perf_counter() - t0))
            assert not buf.flags.writeable and buf.ctypes.data % 4096 == 0
            np.testing.assert_array_equal(buf, expert_bytes(data, 1, e))
        order = [e for e, _ in got]
        assert sorted(order) == [0, 2, 5] and order[-1] == 2
        assert dict(got)[5] < delay / 2 and dict(got)[0] < delay / 2 and got[-1][1] >= delay
        assert store.stats.totals.io_wait_s >= delay / 2
        t1 = time.perf_counter()
        bufs = store.wait(f)
        assert time.perf_counter() - t1 < delay / 5
        for e, buf in zip([2, 0, 5], bufs):
            np.testing.assert_array_equal(buf, expert_bytes(data, 1, e))
        store.release(f)
        with pytest.raises(ValueError, match="already released"):
            next(store.as_read(f))


@pytest.mark.parametrize("mode", ["pagecache", "direct"])
def test_reads_in_parts_land_expert_after_expert_with_the_same_bytes_and_counts(layers, monkeypatch, mode):
    """read_parts = threads: each expert's parts run together, so a fetch's experts land one after another
    (in fetch order) instead of all at its end; the bytes, reads and bytes read are those of whole reads."""
    files, data = layers
    real_preadv = os.preadv
    counts = {}
    for parts in (1, 3):
        with make_store(files, mode, threads=3, read_parts=parts) as store:
            def slow_preadv(fd, buffers, offset, flags=0):
                time.sleep(0.05)
                return real_preadv(fd, buffers, offset, flags)

            monkeypatch.setattr(os, "preadv", slow_preadv)
            f = store.fetch(1, [0, 7, 3])
            order = [e for e, _ in store.as_read(f)]
            monkeypatch.setattr(os, "preadv", real_preadv)
            for e, buf in zip([0, 7, 3], store.wait(f)):
                np.testing.assert_array_equal(buf, expert_bytes(data, 1, e))
            store.release(f)
            t = store.stats.totals
            counts[parts] = (t.reads, t.bytes_read, t.disk_bytes, t.hits + t.misses)
        if parts == 3:
            assert order == [0, 7, 3]
    assert counts[3] == counts[1] and counts[1][0] == 3


# Each step fetches one expert of layer 1 and releases it: (expert, hit?) per policy, then the final cache.
EVICTION_TRACE = [0, 0, 0, 1, 2, 1, 2, 3, 1, 4]
EXPECTED = {
    # capacity 3. LRU: 3 evicts 0 (oldest use), 1 hits, 4 evicts 2.
    "lru": ([0, 1, 1, 0, 0, 1, 1, 0, 1, 0], {1, 3, 4}),
    # FIFO: hits do not refresh; 3 evicts 0, 1 hits, 4 evicts 1 (inserted before 2 and 3).
    "fifo": ([0, 1, 1, 0, 0, 1, 1, 0, 1, 0], {2, 3, 4}),
    # LFU: counts 0:3, 1:2, 2:2 -> 3 evicts 1 (tie with 2, less recent); 1 misses and evicts 3 (count 1);
    # 4 evicts 1 (count 1, vs 0:3, 2:2).
    "lfu": ([0, 1, 1, 0, 0, 1, 1, 0, 0, 0], {0, 2, 4}),
}


@pytest.mark.parametrize("policy", sorted(EXPECTED))
def test_cache_hits_misses_and_eviction_order_per_policy(layers, policy):
    files, data = layers
    hits_expected, final = EXPECTED[policy]
    with make_store(files, "direct", cache_bytes=3 * SLOT + SLOT // 2, policy=policy) as store:
        for e, hit in zip(EVICTION_TRACE, hits_expected):
            before = store.stats.totals.reads
            f = store.fetch(1, [e])
            np.testing.assert_array_equal(store.wait(f)[0], expert_bytes(data, 1, e))
            store.release(f)
            assert store.stats.totals.reads - before == 1 - hit, (e, hit)
        assert {e for _, e in store.cached_experts()} == final
        t = store.stats.totals
        assert (t.hits, t.misses) == (sum(hits_expected), len(hits_expected) - sum(hits_expected))
        assert store.cache_bytes == 3 * SLOT
    assert simulate_hit_rate(EVICTION_TRACE, 3, policy) == sum(hits_expected) / len(hits_expected)


def test_cache_hit_returns_the_cached_buffer_without_a_read(layers):
    files, _ = layers
    with make_store(files, "direct", cache_bytes=4 * SLOT) as store:
        f = store.fetch(3, [2])
        first = store.wait(f)[0]
        store.release(f)
        f = store.fetch(3, [2])
        again = store.wait(f)[0]
        assert again.ctypes.data == first.ctypes.data
        assert (store.stats.totals.reads, store.stats.totals.hits) == (1, 1)


def test_cache_is_capped_at_the_experts_on_disk_and_reuses_buffers_after_clear(layers):
    files, data = layers
    with make_store(files, "direct", cache_bytes=1 << 30) as store:
        for layer in (1, 3):
            store.release(store.fetch(layer, range(NUM_EXPERTS)))
        assert store.cache_bytes == 2 * NUM_EXPERTS * SLOT
        addresses = {int(store._cache[k].buf.ctypes.data) for k in store.cached_experts()}
        store.clear_cache()
        assert store.cached_experts() == []
        f = store.fetch(3, [4])
        buf = store.wait(f)[0]
        np.testing.assert_array_equal(buf, expert_bytes(data, 3, 4))
        assert buf.ctypes.data in addresses and store.cache_bytes == 2 * NUM_EXPERTS * SLOT


def test_entries_in_use_are_not_evicted_and_misses_then_use_read_buffers(layers):
    files, data = layers
    with make_store(files, "direct", cache_bytes=2 * SLOT) as store:
        held = store.fetch(1, [0, 1])  # fills the cache and stays live
        store.wait(held)
        f = store.fetch(3, [0])
        np.testing.assert_array_equal(store.wait(f)[0], expert_bytes(data, 3, 0))
        assert store.cached_experts() == [(1, 0), (1, 1)]
        assert store.allocated_buffer_bytes == SLOT
        store.release(f)
        store.release(held)
        f = store.fetch(3, [0])  # now (1, 0) may go
        store.wait(f)
        assert store.cached_experts() == [(1, 1), (3, 0)]


def test_stats_count_exactly_the_reads_and_bytes_performed(layers):
    files, _ = layers
    stats = Stats(num_layers=2)
    with make_store(files, "pagecache", stats=stats) as store:
        stats.start()
        for ids in ([0, 1, 2], [3, 3]):
            for layer in (1, 3):
                f = store.fetch(layer, ids)
                with stats.stage("experts"):
                    store.wait(f)
                store.release(f)
            stats.token_done()
    assert stats.totals.reads == 2 * 4
    assert stats.totals.bytes_read == 2 * 4 * NBYTES
    assert [t.counters.reads for t in stats.tokens] == [6, 2]
    assert [t.counters.bytes_read for t in stats.tokens] == [6 * NBYTES, 2 * NBYTES]
    assert stats.stage_s["experts"] == pytest.approx(stats.totals.compute_s)

    stats = Stats()
    with make_store(files, "direct", cache_bytes=2 * SLOT, stats=stats) as store:
        for ids in ([0, 1, 2], [1, 5]):  # 0, 1 cached, 2 into a read buffer; then 1 hits, 5 evicts 0
            f = store.fetch(1, ids)
            store.wait(f)
            store.release(f)
    # direct reads are SLOT long (only the last expert's read would stop short, at the file's end)
    t = stats.totals
    assert (t.hits, t.misses, t.reads) == (1, 4, 4)
    assert t.bytes_read == t.disk_bytes == 4 * SLOT


def test_pagecache_mode_tells_page_cache_hits_from_disk_reads(layers):
    files, _ = layers
    with make_store(files, "pagecache") as store:
        store.evict_page_cache()
        store.wait(store.fetch(1, [4]))
        cold = store.stats.totals
        assert (cold.misses, cold.hits, cold.disk_bytes) == (1, 0, NBYTES)
        store.wait(store.fetch(1, [4]))
        warm = store.stats.totals
        assert (warm.misses, warm.hits, warm.disk_bytes, warm.bytes_read) == (1, 1, NBYTES, 2 * NBYTES)


def test_a_read_the_page_cache_did_not_hold_is_from_disk_even_if_rwf_nowait_returns_it(layers, monkeypatch):
    """RWF_NOWAIT's try starts the reads of the pages it lacks and, where the device answers first (a fast disk,
    a small expert), returns them too: the store asks mincore before the read instead. Simulated: every read
    with RWF_NOWAIT returns its bytes."""
    files, _ = layers
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset, flags=0: real_preadv(fd, buffers, offset))
    with make_store(files, "pagecache") as store:
        assert store.evict_page_cache() == 0
        for _ in range(2):
            f = store.fetch(1, [4])
            store.wait(f)
            store.release(f)
        assert [(r.hit, r.disk_bytes) for r in store.report(f)] == [(True, 0)]
        t = store.stats.totals
        assert (t.misses, t.hits, t.disk_bytes, t.bytes_read) == (1, 1, NBYTES, 2 * NBYTES)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a tmpfs at /dev/shm, whose pages are the file")
def test_eviction_tells_the_bytes_the_page_cache_kept():
    """tmpfs pages are the file itself: POSIX_FADV_DONTNEED cannot drop them, and the store says so."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        data = np.zeros((NUM_EXPERTS - 1) * STRIDE + NBYTES, np.uint8)
        kept = -(-data.size // mmap.PAGESIZE) * mmap.PAGESIZE  # every page of the file
        files = {1: write_layer(Path(shm) / "layer_001.bin", data)}
        with make_store(files, "pagecache") as store, pytest.warns(RuntimeWarning, match=f"kept {kept} bytes"):
            assert store.evict_page_cache() == kept


@pytest.mark.parametrize("policy,hits", [("lru", 0), ("lru-layer", 2 * 9)])
def test_lru_layer_keeps_a_share_per_layer_where_lru_loops(layers, policy, hits):
    """4 entries, 2 layers: layer 1 reuses 2 experts, layer 3 cycles through 3. The 5-expert cycle defeats
    global LRU; with a share of 2 per layer, layer 3's misses evict only layer 3's entries."""
    files, _ = layers
    with make_store(files, "direct", cache_bytes=4 * SLOT, policy=policy) as store:
        for _ in range(10):
            for layer, ids in ((1, [0, 1]), (3, [0, 1, 2])):
                for e in ids:
                    f = store.fetch(layer, [e])
                    store.wait(f)
                    store.release(f)
        assert store.stats.totals.hits == hits  # lru-layer: layer 1's two experts hit after the first round


@pytest.mark.parametrize("policy", ["lru-layer", "lfu-layer"])
def test_a_layer_at_its_share_with_every_entry_in_use_evicts_another_layers(policy):
    """3 entries over 3 layers (a share of 1) and a call that uses 2 of one layer: its own share is full of
    entries in use, so the victim comes from another layer (it once was None, which the VRAM tier crashed on)."""
    from flashmoe.runtime.eviction import make_policy

    p = make_policy(policy, 3)
    for key in ((0, 1), (1, 1), (1, 2)):
        p.insert(key)
    in_use = {(1, 1), (1, 2)}
    assert p.victim(lambda k: k not in in_use, (1, 3)) == (0, 1)


@pytest.mark.parametrize("mode,cache_bytes", [("pagecache", 0), ("direct", 0), ("direct", 4 * SLOT)])
def test_a_fetch_takes_over_the_right_guesses_and_stops_the_wrong_ones(layers, mode, cache_bytes):
    files, data = layers
    with make_store(files, mode, cache_bytes=cache_bytes, guess_slots=2) as store:
        current = store.fetch(1, [0])
        store.speculate(3, [6, 7, 5], after=current)  # two slots: 5 is not read
        store.wait(current)
        store.release(current)
        f = store.fetch(3, [7, 2])
        bufs = store.wait(f)
        np.testing.assert_array_equal(bufs[0], expert_bytes(data, 3, 7))
        np.testing.assert_array_equal(bufs[1], expert_bytes(data, 3, 2))
        store.release(f)
        assert ((3, 7) in store.cached_experts()) == (cache_bytes > 0)  # a used guess is cached like a read
        store.clear_cache()  # waits for the stopped guess, so its bytes are counted
        t = store.stats.totals
        assert (t.guesses, t.guesses_used) == (2, 1)
        assert 0 <= t.guess_wasted_bytes <= SLOT
        assert t.hits + t.misses == 3  # experts 0, 7 and 2 of two layers; the taken-over guess is a lookup
        assert store.allocated_buffer_bytes <= 4 * SLOT


def test_guesses_start_after_the_reads_they_follow_and_stop_within_one_piece(layers, monkeypatch):
    files, _ = layers
    import flashmoe.runtime.expert_files as expert_files

    monkeypatch.setattr(expert_files, "GUESS_CHUNK", ALIGN)
    events, lock = [], threading.Lock()
    real_preadv = os.preadv
    fds = {}
    # The guess's first piece is held, once it has started, until the fetch that proves the guess wrong is made:
    # the test then stops the guess in its first piece however the machine schedules its threads (a sleep of
    # the test's own thread, here before, let a loaded machine's guess read more pieces or none).
    guess_reading, fetched = threading.Event(), threading.Event()

    def slow_preadv(fd, buffers, offset, flags=0):
        start = time.perf_counter()
        if fds.get(fd) == 3 and not fetched.is_set():
            guess_reading.set()
            fetched.wait(timeout=30)
        time.sleep(0.05)  # a demand read slow enough that a guess not waiting for it would overlap it
        n = real_preadv(fd, buffers, offset, flags)
        with lock:
            events.append((fds.get(fd), offset, start, time.perf_counter(), n))
        return n

    with make_store(files, "direct", guess_slots=2) as store:
        fds.update({fd: layer for layer, fd in store.files._fds.items()})
        monkeypatch.setattr(os, "preadv", slow_preadv)
        current = store.fetch(1, [0, 1])
        store.speculate(3, [6], after=current)
        store.wait(current)
        demand_end = max(end for layer, _, _, end, _ in events if layer == 1)
        assert guess_reading.wait(timeout=30), "the guess never started"
        f = store.fetch(3, [2])  # 6 was wrong: stopped after the piece being read
        fetched.set()
        store.wait(f)
        store.release(f)
        store.release(current)
        store.clear_cache()
    guess_reads = [(start, n) for layer, offset, start, _, n in events if layer == 3 and offset >= 6 * STRIDE]
    assert guess_reads and min(start for start, _ in guess_reads) > demand_end
    assert sum(n for _, n in guess_reads) <= 2 * ALIGN < NBYTES
    assert store.stats.totals.guess_wasted_bytes == sum(n for _, n in guess_reads)


def test_speculation_is_off_without_guess_slots(layers):
    files, _ = layers
    with make_store(files, "direct") as store:
        store.speculate(3, [6, 7])
        assert store.stats.totals.guesses == 0 and store.allocated_buffer_bytes == 0


@pytest.mark.parametrize("mode", ["pagecache", "direct"])
def test_buffers_stay_valid_until_released_even_with_two_fetches_of_one_layer(layers, mode):
    files, data = layers
    with make_store(files, mode, cache_bytes=2 * SLOT) as store:
        current = store.fetch(1, [0, 5])
        bufs = store.wait(current)
        pending = store.fetch(1, [6, 7])  # prefill: the next batch reads while this one computes
        store.wait(pending)
        for e, buf in zip([0, 5], bufs):
            np.testing.assert_array_equal(buf, expert_bytes(data, 1, e))
        store.release(current)
        store.release(current)  # idempotent
        assert current.released and not pending.released
        with pytest.raises(ValueError, match="already released"):
            store.wait(current)
        store.release_all()
        assert pending.released


def test_released_read_buffers_are_reused(layers):
    files, _ = layers
    with make_store(files, "pagecache") as store:
        f = store.fetch(1, [0])
        addr = store.wait(f)[0].ctypes.data
        store.release(f)
        assert store.wait(store.fetch(3, [1]))[0].ctypes.data == addr
        assert store.allocated_buffer_bytes == SLOT
        store.fetch(3, [2, 3])
        assert store.allocated_buffer_bytes == 3 * SLOT


def test_read_buffer_bound_covers_decode_and_two_prefill_batches():
    assert ExpertStore.read_buffer_bytes(10, NBYTES, threads=4) == 10 * SLOT
    assert ExpertStore.read_buffer_bytes(4, NBYTES, threads=4) == 8 * SLOT
    assert ExpertStore.read_buffer_bytes(4, STRIDE) == 16 * STRIDE


def test_short_file_is_refused_at_open_naming_file_and_expert(layers):
    files, data = layers
    with open(files[3], "r+b") as f:
        f.truncate(5 * STRIDE + 100)
    with pytest.raises(FormatError, match=r"layer_003\.bin.*expert 5 is cut off"):
        make_store(files)


@pytest.mark.parametrize("mode,read_parts", [("pagecache", 1), ("direct", 1), ("pagecache", 3), ("direct", 3)])
def test_file_truncated_after_open_gives_format_error_naming_file_and_expert(layers, mode, read_parts):
    files, data = layers
    with make_store(files, mode, read_parts=read_parts) as store:
        with open(files[1], "r+b") as f:
            f.truncate(6 * STRIDE + 100)
        f = store.fetch(1, [2, 6])
        with pytest.raises(FormatError, match=r"layer_001\.bin: expert 6 of layer 1 .*ends at byte"):
            store.wait(f)
        np.testing.assert_array_equal(store.wait(store.fetch(1, [2]))[0], expert_bytes(data, 1, 2))


def test_direct_mode_falls_back_with_one_warning_when_o_direct_is_refused(layers, monkeypatch):
    # Simulated: tmpfs refused O_DIRECT with EINVAL before Linux 6.6, but accepts it since.
    files, data = layers
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.warns(RuntimeWarning, match="O_DIRECT is not supported") as record:
        store = make_store(files, "direct", cache_bytes=2 * SLOT)
    assert len(record) == 1 and "1 other expert files" in str(record[0].message)
    with store:
        assert store.direct is False
        np.testing.assert_array_equal(store.wait(store.fetch(3, [7]))[0], expert_bytes(data, 3, 7))


def test_a_backend_allocator_provides_every_buffer(layers):
    files, data = layers
    owned = []

    def allocate(nbytes):
        owned.append(np.frombuffer(bytearray(nbytes + 2 * ALIGN), dtype=np.uint8))
        skip = -owned[-1].ctypes.data % ALIGN
        return owned[-1][skip : skip + nbytes]

    def inside_owned(buf):
        return any(o.ctypes.data <= buf.ctypes.data < o.ctypes.data + o.size for o in owned)

    with make_store(files, "direct", cache_bytes=SLOT, allocate=allocate) as store:
        bufs = store.wait(store.fetch(1, [2, 3]))  # one into the cache, one into a read buffer
        assert all(inside_owned(b) for b in bufs)
        np.testing.assert_array_equal(bufs[1], expert_bytes(data, 1, 3))
    with pytest.raises(ValueError, match="page offset 1"):
        with make_store(files, allocate=lambda n: allocate(n + 1)[1:]) as store:
            store.fetch(1, [0])


def test_bad_arguments_are_refused(layers):
    files, _ = layers
    with pytest.raises(ValueError, match="multiple of 4096"):
        ExpertStore(files, NUM_EXPERTS, STRIDE + 1, NBYTES)
    with pytest.raises(ValueError, match="unknown I/O mode"):
        make_store(files, "mmap")
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_store(files, "direct", policy="random")
    with pytest.raises(FormatError, match="missing"):
        make_store({**files, 5: files[1].with_name("layer_005.bin")})
    with make_store(files) as store:
        with pytest.raises(ValueError, match=r"expert ids \[8\] of layer 1"):
            store.fetch(1, [0, 8])
        with pytest.raises(ValueError, match="layer 2 has no expert file"):
            store.fetch(2, [0])


def test_stats_report_as_text_and_json(layers):
    files, _ = layers
    stats = Stats(num_layers=2)
    with make_store(files, "direct", cache_bytes=8 * SLOT, stats=stats) as store:
        stats.start()
        for _ in range(3):
            for layer in (1, 3):
                f = store.fetch(layer, [1, 2])
                stats.add_stage_time("attention", 0.001)
                store.wait(f)
                store.release(f)
            stats.token_done()
    d = json.loads(json.dumps(stats.to_dict()))
    assert d["tokens"] == 3 and d["hit_rate"] == pytest.approx(8 / 12)
    assert d["per_decode_token"]["reads"] == 0 and d["per_decode_token"]["hits"] == 4
    assert d["ms_per_layer"]["compute"] == pytest.approx(1.0)  # 2 x 1 ms per token over 2 layers
    assert d["peak_rss_bytes"] >= d["current_rss_bytes"] > 0
    text = stats.summary()
    assert "hit rate: 66.7%" in text and "decode:" in text and "time to first token" in text


@pytest.mark.parametrize("mode", ["pagecache", "direct"])
def test_report_tells_each_fetch_its_hits_and_bytes_and_sums_to_the_stats(layers, mode):
    files, _ = layers
    with make_store(files, mode, cache_bytes=2 * SLOT) as store:
        assert store.evict_page_cache() == 0
        reports = []
        # a repeated id is one read; then expert 1 again (in the cache, own or the OS's), then one never read
        # (of layer 3: the kernel's readahead may already hold the rest of layer 1's file)
        for layer, ids in ((1, [0, 1, 0]), (1, [1]), (3, [2])):
            f = store.fetch(layer, ids)
            store.wait(f)
            store.release(f)
            reports.append(store.report(f))
        assert [[r.expert for r in rep] for rep in reports] == [[0, 1], [1], [2]]
        assert [r.hit for r in reports[0]] == [False, False]
        if mode == "direct":
            assert [(r.hit, r.bytes_read) for r in reports[1] + reports[2]] == [(True, 0), (False, SLOT)]
        else:
            assert [(r.hit, r.bytes_read, r.disk_bytes) for r in reports[1] + reports[2]] == [
                (True, NBYTES, 0), (False, NBYTES, NBYTES)]
        t = store.stats.totals
        everything = [r for rep in reports for r in rep]
        assert sum(r.bytes_read for r in everything) == t.bytes_read
        assert sum(r.disk_bytes for r in everything) == t.disk_bytes
        assert (sum(r.hit for r in everything), sum(not r.hit for r in everything)) == (t.hits, t.misses)
