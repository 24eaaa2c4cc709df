"""Experts used where they already are in memory: pagecache mode's in-place hits through the expert file's
read-only mapping, and direct mode's hits computed from the cache entry itself."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

import flashmoe.runtime.expert_files as expert_files
from flashmoe.format.manifest import ALIGN
from flashmoe.runtime.engine import prefill_batches
from flashmoe.runtime.load import load_engine
from flashmoe.runtime.memory import current_rss_bytes
from test_store import NBYTES, NUM_EXPERTS, SLOT, STRIDE, expert_bytes, layers, make_store  # noqa: F401 (a fixture)

TOKENS = [1, 200, 31, 7, 99]


def _in_mapping(store, layer: int, buf: np.ndarray, expert: int) -> bool:
    """buf is expert `expert` of the mapped file itself (not a copy)."""
    return buf.ctypes.data == store.files.mapping(layer).ctypes.data + expert * STRIDE


def test_experts_the_page_cache_holds_are_the_mapped_file_and_are_not_read(layers):
    files, data = layers
    with make_store(files, in_place=True) as store:
        assert store.in_place
        store.wait(store.fetch(3, [2, 5]))  # read if the page cache lost them since they were written
        store.release_all()
        before = copy.copy(store.stats.totals)
        f = store.fetch(3, [5, 2, 5])
        bufs = store.wait(f)
        for e, buf in zip([5, 2, 5], bufs):
            np.testing.assert_array_equal(buf, expert_bytes(data, 3, e))
            assert _in_mapping(store, 3, buf, e) and not buf.flags.writeable
        assert [(r.hit, r.bytes_read, r.disk_bytes) for r in store.report(f)] == [(True, 0, 0)] * 2
        store.release(f)
        d = store.stats.totals - before
        assert (d.reads, d.bytes_read, d.hits, d.misses) == (0, 0, 2, 0)


def test_resident_experts_come_without_a_fetch_or_not_at_all(layers):
    """ExpertStore.resident, decode's fast path: the mapped views of experts the page cache holds, counted as
    hits, nothing to release; None when one of them is not in the page cache or a guess is outstanding."""
    files, data = layers
    with make_store(files, in_place=True, guess_slots=1) as store:
        store.evict_page_cache()
        store.wait(store.fetch(3, [2, 5]))  # now in the page cache; 7 is not
        store.speculate(3, [7])
        assert store.resident(3, [5]) is None  # the guess is settled by a fetch
        store.wait(store.fetch(3, [7]))
        store.release_all()
        before = copy.copy(store.stats.totals)
        views = store.resident(3, np.array([5, 2]))
        for e, view in zip([5, 2], views):
            np.testing.assert_array_equal(view, expert_bytes(data, 3, e))
            assert _in_mapping(store, 3, view, e) and not view.flags.writeable
        d = store.stats.totals - before
        assert (d.reads, d.hits, d.misses) == (0, 2, 0) and not store._live
        store.evict_page_cache()
        assert store.resident(3, [5, 2]) is None
        with pytest.raises(ValueError, match=r"expert ids \[9\] of layer 3"):
            store.resident(3, [9])


def test_a_fetch_asks_for_views_itself_where_the_store_hands_out_buffers(layers):
    """The CPU way of --expert-device: the store's in_place off (the GPU's fetches get read buffers), the files
    still mapped; a fetch or resident call with in_place=True takes the page cache's experts in place, the
    next plain fetch reads them into buffers again."""
    files, data = layers
    with make_store(files, in_place=True) as store:
        store.wait(store.fetch(3, [2, 5]))  # now in the page cache
        store.release_all()
        store.in_place = False
        assert store.resident(3, [2, 5]) is None
        views = store.resident(3, [2, 5], in_place=True)
        assert all(_in_mapping(store, 3, v, e) for v, e in zip(views, [2, 5]))
        reads = store.stats.totals.reads
        f = store.fetch(3, [5], in_place=True)
        assert _in_mapping(store, 3, store.wait(f)[0], 5) and store.stats.totals.reads == reads
        store.release(f)
        f = store.fetch(3, [5])
        buf = store.wait(f)[0]
        assert not _in_mapping(store, 3, buf, 5) and store.stats.totals.reads == reads + 1
        np.testing.assert_array_equal(buf, expert_bytes(data, 3, 5))
        store.release(f)


def test_a_store_without_mapped_files_reads_what_a_fetch_asks_in_place(layers):
    files, _ = layers
    with make_store(files) as store:
        store.wait(store.fetch(3, [2]))
        store.release_all()
        assert store.resident(3, [2], in_place=True) is None
        f = store.fetch(3, [2], in_place=True)
        store.wait(f)
        assert [r.bytes_read for r in store.report(f)] == [NBYTES]
        store.release(f)


def test_a_cold_expert_is_read_into_a_buffer_then_used_in_place(layers):
    """The cold path is the copy path: one preadv into a read buffer, never a fault through the mapping; the
    next fetch finds the pages that read brought in. Evicting lets go of mapped pages too (cold stays cold)."""
    files, data = layers
    with make_store(files, in_place=True) as store:
        store.wait(store.fetch(1, [4]))
        store.release_all()
        store.evict_page_cache()
        f = store.fetch(1, [4])
        cold = store.wait(f)[0]
        assert not _in_mapping(store, 1, cold, 4) and store.allocated_buffer_bytes == SLOT
        np.testing.assert_array_equal(cold, expert_bytes(data, 1, 4))
        store.release(f)
        t = store.stats.totals
        assert (t.reads, t.bytes_read, t.disk_bytes, t.misses) == (1, NBYTES, NBYTES, 1)
        warm = store.wait(store.fetch(1, [4]))[0]
        assert _in_mapping(store, 1, warm, 4) and store.stats.totals.reads == 1


@pytest.mark.parametrize("populate", [True, False])
def test_a_read_maps_the_expert_it_brought_in(layers, populate):
    """After a cold read the mapper thread maps the expert's pages (MADV_POPULATE_READ), so its first use in
    place takes no page fault; without it (a kernel before 5.14) the first touch faults."""
    import resource

    files, data = layers
    with make_store(files, in_place=True) as store:
        store.files._populate &= populate
        store.evict_page_cache()
        store.wait(store.fetch(3, [5]))
        store.release_all()
        if store.files._last_mapped is not None:  # the mapper is done
            store.files._last_mapped.result()
        view = store.wait(store.fetch(3, [5]))[0]
        assert _in_mapping(store, 3, view, 5)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        touched = [int(view[i]) for i in range(0, NBYTES, ALIGN)]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        assert touched == [int(b) for b in expert_bytes(data, 3, 5)[::ALIGN]]
        assert (faults == 0) == populate


def test_an_expert_partly_in_the_page_cache_is_read(layers):
    files, data = layers
    with make_store(files, in_place=True) as store:
        store.evict_page_cache()
        fd = os.open(files[3], os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: exactly one page
            os.pread(fd, ALIGN, 6 * STRIDE)  # the first of expert 6's three pages
        finally:
            os.close(fd)
        f = store.fetch(3, [6])
        np.testing.assert_array_equal(store.wait(f)[0], expert_bytes(data, 3, 6))
        assert [(r.hit, r.bytes_read, r.disk_bytes) for r in store.report(f)] == [(False, NBYTES, NBYTES - ALIGN)]


def test_guesses_skip_experts_the_page_cache_holds(layers):
    files, _ = layers
    with make_store(files, in_place=True, guess_slots=2) as store:
        store.evict_page_cache()
        store.wait(store.fetch(3, [1]))  # now in the page cache
        store.release_all()
        store.speculate(3, [1, 2])
        f = store.fetch(3, [1, 2])
        bufs = store.wait(f)
        assert _in_mapping(store, 3, bufs[0], 1) and not _in_mapping(store, 3, bufs[1], 2)
        assert (store.stats.totals.guesses, store.stats.totals.guesses_used) == (1, 1)


def test_files_whose_page_cache_state_is_hidden_are_always_read(layers, monkeypatch):
    """Linux reports every page of a file the process neither owns nor may write as present (mincore):
    such a file is not mapped, or a cold expert would be faulted in through the mapping."""
    files, data = layers
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(files[1]).st_uid + 1)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False)
    assert not expert_files.residency_visible(files[1])
    with make_store(files, in_place=True) as store:
        assert store.files.mapping(1) is None
        buf = store.wait(store.fetch(1, [3]))[0]
        np.testing.assert_array_equal(buf, expert_bytes(data, 1, 3))
        assert store.stats.totals.reads == 1


def test_in_place_needs_pagecache_mode(layers):
    files, _ = layers
    with make_store(files, "direct", in_place=True) as store:
        assert not store.in_place and store.files.mapping(1) is None


def _spy_experts(engine) -> list[tuple[int, int, int]]:
    """Record (layer, expert, address of its gate_proj words) for every expert the backend computes."""
    seen, real = [], engine.backend.experts_ffn

    def experts_ffn(x, experts, weights, keys=None, act=None):
        seen.extend((layer, e, ex["gate_proj"].weight.ctypes.data) for (layer, e), ex in zip(keys, experts))
        return real(x, experts, weights, keys, act)

    engine.backend.experts_ffn = experts_ffn
    return seen


def _decode(engine) -> np.ndarray:
    state = engine.new_state()
    logits = [engine.forward(np.array(TOKENS[:2]), state)]
    logits += [engine.forward(np.array([t]), state) for t in TOKENS[2:]]
    return np.concatenate(logits)


def test_the_backend_computes_on_the_page_cache_and_gets_the_same_logits():
    """pagecache mode, bundled model (its 12 MB of experts in the page cache once read): every decode expert
    the backend computes on is the mapped file's bytes, no expert is read, and the logits equal those of the
    copying path bit for bit."""
    engine = load_engine(None, backend="numpy", io="pagecache", context=64)
    store, layout = engine.store, engine.model_dir.layout
    gate = next(c.offset for c in layout.components if c.name == "gate_proj.weight")
    store.in_place = False
    copied = _decode(engine)
    reads = store.stats.totals.reads
    store.in_place = True
    seen = _spy_experts(engine)
    try:
        np.testing.assert_array_equal(_decode(engine), copied)
    finally:
        del engine.backend.experts_ffn  # the backend instance is shared
    assert store.stats.totals.reads == reads
    assert len(seen) == (len(TOKENS) - 2) * len(engine.model_dir.moe_layers) * engine.k
    for layer, e, address in seen:
        assert address == store.files.mapping(layer).ctypes.data + e * layout.stride + gate


def test_a_direct_mode_hit_is_computed_from_the_cache_entry():
    # room for every expert of the bundled model (12 MB) above what this process already holds
    engine = load_engine(None, backend="numpy", io="direct", max_memory=current_rss_bytes() + (256 << 20), context=64)
    store, layout = engine.store, engine.model_dir.layout
    gate = next(c.offset for c in layout.components if c.name == "gate_proj.weight")
    _decode(engine)
    reads = store.stats.totals.reads
    seen = _spy_experts(engine)
    try:
        _decode(engine)  # the same tokens: every expert is in the cache
    finally:
        del engine.backend.experts_ffn
    assert store.stats.totals.reads == reads and seen
    for layer, e, address in seen:
        assert address == store._cache[(layer, e)].buf.ctypes.data + gate


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_backends_with_memory_of_their_own_keep_their_copy(backend):
    from flashmoe.backends.base import BackendError, _load

    assert _load("numba").experts_in_place and _load("numpy").experts_in_place
    try:
        cls = _load(backend)
    except BackendError as e:
        pytest.skip(f"{backend} backend cannot be imported here: {e}")
    assert not cls.experts_in_place


def test_the_in_place_microbenchmark_measures_every_variant(capsys):
    """bench/bench_in_place.py on the bundled model: one line per variant, with the expert count it ran."""
    from flashmoe.bench.bench_in_place import main
    from flashmoe.runtime.load import default_model_dir

    main([str(default_model_dir()), "--experts", "8", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    variants = [line[5:37].strip() for line in lines if " per expert " in line]  # "warm NAME (32 wide) ..."
    assert variants == ["copy", "in place, first use", "in place", "preadv (the store's miss path)",
                        "fault in, MADV_NORMAL", "fault in, MADV_RANDOM", "MADV_WILLNEED, then fault in"]
    assert all("n=8)" in line for line in lines if line.startswith("warm "))
    assert sum(int(line.rsplit("n=", 1)[1].rstrip(")")) for line in lines if line.startswith("cold ")) == 8


def test_in_memory_names_the_experts_a_fetch_would_not_read(layers):
    """pagecache in place: the experts the page cache holds whole; direct: the cached ones; in order, once."""
    files, _ = layers
    with make_store(files, in_place=True) as store:
        store.evict_page_cache()
        store.wait(store.fetch(3, [5, 1]))  # read: now in the page cache
        store.release_all()
        assert store.in_memory(3, [6, 5, 1, 5]) == [5, 1]
        reads = store.stats.totals.reads
        store.release(store.fetch(3, [5, 1]))
        assert store.stats.totals.reads == reads
    with make_store(files, "direct", cache_bytes=4 * SLOT) as store:
        store.release(store.fetch(1, [2]))
        assert store.in_memory(1, [0, 2]) == [2] and store.in_memory(3, [2]) == []
        with pytest.raises(ValueError):
            store.in_memory(1, [NUM_EXPERTS])


def test_prefill_batches_read_at_most_a_batch_each_and_keep_the_experts_in_order():
    unique = np.arange(20)
    cut = [b.tolist() for b in prefill_batches(unique, [0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13], 3)]
    assert cut == [list(range(15)), [15, 16, 17], [18, 19]]  # misses 3, 4, 14 | 15, 16, 17 | 18, 19
    assert [b.tolist() for b in prefill_batches(unique, [], 8)] == [list(range(8)), list(range(8, 16)), list(range(16, 20))]
    assert [b.tolist() for b in prefill_batches(unique, list(range(20)), 8)] == [list(range(20))]


@pytest.mark.numba
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_prompts_logits_do_not_depend_on_which_experts_are_in_memory(backend):
    """The bundled model's prompt with its experts read in batches of store.batch_size (in place off) and
    with every expert in the page cache used in place as one batch: the same logits, bit for bit (the
    batches keep the experts' order, so every sum over them too)."""
    engine = load_engine(None, backend=backend, io="pagecache", context=64)
    prompt = np.array(TOKENS * 4)
    engine.forward(prompt, engine.new_state())  # every expert read once: now in the page cache
    engine.store.in_place = False
    batched = engine.forward(prompt, engine.new_state(), all_logits=True)
    engine.store.in_place = True
    np.testing.assert_array_equal(engine.forward(prompt, engine.new_state(), all_logits=True), batched)
