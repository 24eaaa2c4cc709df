"""The expert store: reads routed experts from `experts/layer_NNN.bin` with parallel `preadv`.

Expert `e` of a layer occupies bytes `[e*stride, e*stride + nbytes)` of that layer's file (docs/formats.md);
`stride` is a multiple of 4096, so one read fetches one whole expert and O_DIRECT reads stay aligned.

Two modes (docs/design.md, "The expert store"):
- `pagecache`: the kernel's page cache holds hot experts and the process stays small. With `in_place`, an
  expert whose every page the page cache holds (mincore) is not copied: `wait` returns a read-only view of
  the expert file's mapping and the backend computes on the page cache itself (a hit, no read). Other
  experts are read with buffered reads into reusable page-aligned buffers; each read first tries
  `RWF_NOWAIT`, which only copies what the page cache already holds, so the store can count page-cache hits
  and the bytes that really came from disk (an expert whose first page mincore finds missing skips that try,
  which would start the disk reads itself and, on a fast device, return them as cached). A cold
  expert is read, not faulted in through the mapping: one `preadv` per expert keeps the disk's full request
  size (Flash-MoE measured page faults on a mapping 5x slower for cold reads).
- `direct`: `O_DIRECT` reads (page-aligned buffer, length rounded up to 4096) into flashmoe's own cache of
  `cache_bytes`, evicted by a pluggable policy (flashmoe/runtime/eviction.py). A hit returns the cache entry
  itself, without a read or a copy. Where the filesystem refuses O_DIRECT (tmpfs), the store warns once and
  reads buffered.

Usage by the engine, per MoE layer per token (or per prefill batch of `store.batch_size` experts)::

    f = store.fetch(layer, expert_ids)   # starts every read at once, returns at once
    ...compute the shared expert...
    bufs = store.wait(f)                 # list of read-only np.uint8 arrays, one per id, length nbytes
    ...expert FFN on layout.view(buf) for each buf...
    store.release(f)

or, to use each expert as soon as its read lands (a GPU backend copies it to the device while the others are
still being read), `for e, buf in store.as_read(f): ...` in place of `wait`.

Buffer lifetime: the arrays that `wait` returns stay valid until `release(f)`, and only that: several
fetches, of the same layer or not, may be alive together (prefill keeps the next batch in flight while the
current one computes). After `release` their memory is reused for other experts: never keep them (or
views of them) longer. Until released, a fetch holds one pool buffer per distinct expert id (direct mode:
or pins its cache entries; an in-place expert holds nothing), so the engine must release every fetch;
`release_all()` (e.g. in a `finally` around a generation, for Ctrl-C) releases whatever is left.
Read-buffer memory is then bounded by `ExpertStore.read_buffer_bytes(k, nbytes, threads)` when decode
fetches k experts and prefill keeps at most two batches of `batch_size` alive.

In-place experts are page cache, outside `--max-memory`, but count in the process's RSS while mapped
(docs/design.md, "Memory accounting of mapped pages").

The store is used from one thread (the engine's); its worker threads only read into buffers they were
handed. Statistics go to a `flashmoe.runtime.stats.Stats` (the engine's, or the store's own).
"""

from __future__ import annotations

import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from flashmoe.format.manifest import ALIGN
from flashmoe.runtime.eviction import DEFAULT_POLICY, make_policy
from flashmoe.runtime.expert_files import (BufferPool, ExpertFiles, aligned_buffer, checked_allocator, per_layer,
                                           slot_bytes)
from flashmoe.runtime.stats import Stats

DEFAULT_THREADS = 8
MODES = ("pagecache", "direct")
# Speculative reads (ExpertStore.speculate) run this many at a time, most likely guess first (each in pieces
# of expert_files.GUESS_CHUNK): a guess ranked lower gets the disk only when the ones above it are done.
GUESS_READERS = 2


@dataclass
class _Entry:
    """A direct-mode cache entry: the buffer, the read filling it, and how many live fetches use it."""

    buf: np.ndarray
    read: Future
    pins: int = 0


@dataclass
class _Slot:
    """One distinct expert of a fetch: where its bytes land and the read that puts them there.
    `entry` is set when the buffer belongs to the direct-mode cache; `mapped` when it is the file's mapping
    (pagecache mode, in place: no read); else it came from the pool. `hit` when the fetch found it in memory
    (a cache entry's read, if any, belongs to an earlier fetch); `guessed` when a speculative read fills it."""

    expert: int
    buf: np.ndarray
    read: Future
    entry: _Entry | None = None
    hit: bool = False
    mapped: bool = False
    guessed: bool = False


# The read of an in-place expert: none, done (0 bytes read, 0 from disk).
_NO_READ: Future = Future()
_NO_READ.set_result((0, 0))


def _view(s: _Slot, nbytes: int) -> np.ndarray:
    """A read slot's expert bytes as the store hands them out: read-only, `nbytes` long (the mapping's own
    view for an in-place expert)."""
    if s.mapped:
        return s.buf
    v = s.buf[:nbytes]
    v.flags.writeable = False
    return v


@dataclass
class _Guess:
    """A speculative read (`ExpertStore.speculate`): a pool buffer, the read filling it, and the flag that
    stops the read between two pieces once the guess is known to be wrong."""

    buf: np.ndarray
    stop: threading.Event
    read: Future | None = None


@dataclass(frozen=True)
class ExpertRead:
    """What one fetch did for one distinct expert (`ExpertStore.report`).

    hit: found in memory: direct mode, in flashmoe's cache (no read); pagecache mode, every byte already
        in the OS page cache (used in place, no read, or copied); None where the store cannot tell (no
        RWF_NOWAIT and no mapping).
    bytes_read: bytes this fetch copied for it (0 for a direct-mode hit and an in-place one), of which
        disk_bytes came from the device. Summed over all fetches they equal the Stats counters of the
        same names.
    """

    expert: int
    hit: bool | None
    bytes_read: int
    disk_bytes: int


@dataclass(eq=False)
class Fetch:
    """The reads of one `ExpertStore.fetch` call: pass it to `wait` and `release`."""

    layer: int
    expert_ids: tuple[int, ...]
    _slots: dict[int, _Slot] = field(default_factory=dict, repr=False)
    released: bool = False


class ExpertStore:
    """Reads routed experts of every MoE layer; see the module docstring for modes and buffer lifetime.

    Args:
        files: MoE layer index -> path of its `experts/layer_NNN.bin`.
        num_experts: experts per layer (config.json `num_experts`).
        stride: bytes between consecutive experts in a file; a positive multiple of 4096. One int for every
            layer, or a dict by layer (a converted GGUF's layers may hold experts of different types).
        nbytes: bytes of one expert (<= stride); an int or a dict by layer, as `stride`. Read buffers and
            cache entries are sized for the largest.
        mode: "pagecache" or "direct".
        cache_bytes: direct mode: bytes of flashmoe's own expert cache (0: no cache); ignored in pagecache.
        policy: direct mode: eviction policy name (flashmoe.runtime.eviction.POLICIES: "lru", "lfu", "fifo", "lru-layer", "lfu-layer").
        threads: reader threads (default 8); pass max(4, k) so one layer's k reads run together.
        stats: where counters go; default a fresh Stats (`store.stats`).
        allocate: makes read and cache buffers: nbytes -> writable, C-contiguous np.uint8 array of that
            length starting on a page boundary (checked). Default `aligned_buffer`; a backend passes its
            own (e.g. MLX-owned memory) so experts reach it without a copy. Cache buffers are carved
            from allocations of up to 64 MiB.
        guess_slots: read buffers kept for speculative reads (`speculate`); 0 turns speculation off.
        guess_readers: speculative reads running at once (default GUESS_READERS; more where the experts come
            from the page cache, whose copies scale with threads as a disk does not).
        read_parts: each demand read (not a speculative one) cut into this many parts on as many reader
            threads (ExpertFiles.parts), so that a fetch's experts land one after another, each about
            k / read_parts of the fetch's time apart, rather than all together at its end: a caller that uses
            each one as it lands (`as_read`: a GPU copying it) overlaps that with the reads still running.
            Default 1: on an H100 machine's page cache, 10 parts of an expert on 10 threads read at 3.8 GB/s
            where whole experts on 10 threads read at 17.6 (docs/benchmarks.md, issue 15, ninth session).
        in_place: pagecache mode: hand out experts the page cache holds as views of the expert file's
            read-only mapping instead of copying them (module docstring). Only for a backend that computes
            on host memory as it is (Backend.experts_in_place); `allocate` is then used for misses only.
            The attribute `in_place` says whether it is in effect (not without mincore, nor in direct
            mode); switched off, the files stay mapped for the fetches that ask for views themselves
            (`fetch` and `resident` with in_place=True: the CPU way of --expert-device).

    Raises FormatError if a file is missing or too short to hold `num_experts` experts, ValueError for
    inconsistent parameters.
    """

    def __init__(
        self,
        files: dict[int, Path],
        num_experts: int,
        stride: int | dict[int, int],
        nbytes: int | dict[int, int],
        mode: str = "pagecache",
        cache_bytes: int = 0,
        policy: str = DEFAULT_POLICY,
        threads: int | None = None,
        stats: Stats | None = None,
        allocate: Callable[[int], np.ndarray] | None = None,
        guess_slots: int = 0,
        in_place: bool = False,
        guess_readers: int = GUESS_READERS,
        read_parts: int = 1,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown I/O mode {mode!r}; choose one of {', '.join(MODES)}")
        strides, sizes = per_layer(stride, files), per_layer(nbytes, files)
        for layer in files:
            if strides[layer] <= 0 or strides[layer] % ALIGN:
                raise ValueError(f"expert stride {strides[layer]} must be a positive multiple of {ALIGN}")
            if not 0 < sizes[layer] <= strides[layer]:
                raise ValueError(f"expert size {sizes[layer]} must be in (0, stride={strides[layer]}]")
        self.num_experts, self.mode = num_experts, mode
        self.nbytes = max(sizes.values(), default=0)  # the largest expert: what a buffer must hold
        self.stats = stats if stats is not None else Stats()
        self.threads = threads or DEFAULT_THREADS
        self.slot_bytes = slot_bytes(self.nbytes)
        self.files = ExpertFiles(files, num_experts, strides, sizes, mode, in_place)
        self.in_place = self.files.in_place
        self._allocate = checked_allocator(allocate or aligned_buffer)
        self._pool = BufferPool(self.slot_bytes, self._allocate)
        self._cache: dict[tuple[int, int], _Entry] = {}
        self._spare: list[np.ndarray] = []  # allocated cache buffers not holding an expert
        self._cache_slots = 0  # cache buffers allocated (<= _capacity)
        self.policy = policy
        self.set_cache_bytes(cache_bytes)
        self._live: dict[int, Fetch] = {}  # id(fetch) -> fetch, for release_all
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="flashmoe-read")
        self.guess_slots = guess_slots
        self._guesses: dict[tuple[int, int], _Guess] = {}  # outstanding speculative reads
        self._stopped: list[_Guess] = []  # wrong guesses whose read may still be finishing a piece
        self._guess_executor = ThreadPoolExecutor(guess_readers, thread_name_prefix="flashmoe-guess")
        if read_parts < 1:
            raise ValueError(f"read_parts must be at least 1, got {read_parts}")
        self.read_parts = read_parts

    def _drain_done(self) -> None:
        """Move completed reads' counters into stats (engine thread only; the reader threads append them to
        files.finished, and deque append/popleft are thread-safe, so Stats needs no lock)."""
        while self.files.finished:
            nread, disk, demand = self.files.finished.popleft()
            self.stats.record_read(nread, disk)
            # A speculative read is not a lookup; the fetch that uses it counts one (a miss).
            if demand and self.files.tells_hits:
                self.stats.record_lookups(int(disk == 0), int(disk > 0))

    def _evictable(self, key: tuple[int, int]) -> bool:
        entry = self._cache[key]
        return entry.pins == 0 and entry.read.done()

    def _cache_buffer(self, key: tuple[int, int]) -> np.ndarray | None:
        """A buffer for `key`'s new cache entry: a spare one, a new one while the cache has room, else the
        policy's victim's; None when the cache has no room and every entry is in use.

        New buffers come in slabs of up to 64 MiB (one mmap each): one mapping per entry would exceed
        the kernel's mapping limit (vm.max_map_count, 65530) for small experts and a large budget."""
        if not self._spare and self._cache_slots < self._capacity:
            n = min(self._capacity - self._cache_slots, max(1, (64 << 20) // self.slot_bytes))
            slab = self._allocate(n * self.slot_bytes).reshape(n, self.slot_bytes)
            self._spare.extend(slab[::-1])  # pop() hands them out in address order
            self._cache_slots += n
        if self._spare:
            return self._spare.pop()
        victim = self._policy.victim(self._evictable, key) if self._cache else None
        if victim is None:
            return None
        self._policy.remove(victim)
        return self._cache.pop(victim).buf

    def _check_ids(self, layer: int, expert_ids: Iterable[int]) -> tuple[int, ...]:
        if layer not in self.files.layers:
            raise ValueError(f"layer {layer} has no expert file (MoE layers: {self.files.layers})")
        ids = tuple(int(e) for e in expert_ids)
        bad = [e for e in ids if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"expert ids {bad} of layer {layer} are outside [0, {self.num_experts})")
        return ids

    @property
    def batch_size(self) -> int:
        """Experts per fetch that all run at once (one per thread): prefill fetches in batches of this."""
        return self.threads

    @staticmethod
    def read_buffer_bytes(k: int, nbytes: int, threads: int | None = None, guess_slots: int = 0) -> int:
        """Upper bound of read-buffer memory, for the memory budget: decode keeps one fetch of k experts
        alive, prefill two batches of `threads` (default 8), speculation `guess_slots` more; each buffer is
        `slot_bytes(nbytes)`. Passing the stride for `nbytes` gives a bound at least as large."""
        return (max(k, 2 * (threads or DEFAULT_THREADS)) + guess_slots) * slot_bytes(nbytes)

    def in_memory(self, layer: int, expert_ids: Sequence[int]) -> list[int]:
        """The distinct ids of `expert_ids` whose bytes are in memory now (flashmoe's cache, or with `in_place`
        the page cache, whole), in order: a fetch of them reads nothing and takes no read buffer, so prefill
        fetches them all at once rather than in batches of `batch_size`. One evicted between this call and
        the fetch is read like any miss, into a buffer of its own. Raises ValueError like `fetch`."""
        ids = self._check_ids(layer, expert_ids)
        return [e for e in dict.fromkeys(ids)
                if (layer, e) in self._cache or (self.in_place and self.files.resident(layer, e) is not None)]

    def fetch(self, layer: int, expert_ids: Sequence[int], in_place: bool = False) -> Fetch:
        """Start reading experts `expert_ids` of `layer` (ints or an integer array; repeats share one
        read) and return at once. The buffers stay valid until `release` (see buffer lifetime).

        Direct mode: cached experts are hits and are not read; misses are read into cache entries
        (evicting by the policy) or, when no entry can be freed, into pool buffers. Pagecache mode with
        `in_place` (the store's, or this fetch's where the files are mapped): experts the page cache holds
        whole are hits, used through the mapping and not read.
        Experts guessed by `speculate` are taken over with the read already under way (they count as
        misses); the other guesses are stopped.
        Raises ValueError for an unknown layer or an expert id outside [0, num_experts)."""
        ids = self._check_ids(layer, expert_ids)
        guessed = self._settle_guesses(layer, ids)
        f = Fetch(layer, ids)
        in_place = self._in_place(in_place)
        for e in dict.fromkeys(ids):
            f._slots[e] = self._slot(layer, e, guessed.pop(e, None), in_place)
        slots = f._slots.values()
        taken, hits = sum(s.guessed for s in slots), sum(s.hit for s in slots)
        self.stats.record_guesses(0, taken)
        if self.mode == "direct":
            self.stats.record_lookups(hits, len(slots) - hits)
        elif self.files.tells_hits:
            # Pagecache mode counts a demand read's lookup when the read finishes (_drain_done); a guess
            # taken over was read speculatively, so it is counted here, as a miss.
            self.stats.record_lookups(hits, taken)
        self._live[id(f)] = f
        return f

    def resident(self, layer: int, expert_ids: Sequence[int], in_place: bool = False) -> list[np.ndarray] | None:
        """Decode's fast path in pagecache mode with `in_place` (as `fetch`'s): experts `expert_ids` of `layer`
        (distinct ints or an integer array) as read-only views of the expert file's mapping, in order, when
        the page cache holds every one of them (ExpertFiles.residents) and no speculative read is outstanding;
        each counted as a hit. Nothing to wait for or release: the views are valid while the store is open.
        None otherwise; then `fetch` them (it still takes the resident ones in place). A warm decode layer's
        fetch, wait and release cost ~100 us of Python in place (docs/benchmarks.md, "fifth pass").
        Raises ValueError for an expert id outside [0, num_experts)."""
        if not self._in_place(in_place) or self._guesses:
            return None
        ids = [int(e) for e in expert_ids]
        if ids and not 0 <= min(ids) <= max(ids) < self.num_experts:
            self._check_ids(layer, ids)  # raises, naming the ids
        views = self.files.residents(layer, ids)
        if views is not None and self.files.tells_hits:
            self.stats.record_lookups(len(views), 0)
        return views

    def _in_place(self, asked: bool) -> bool:
        """Whether a fetch hands out the page cache's views: the store's `in_place`, or `asked` by the fetch
        where the files are mapped."""
        return self.in_place or (asked and self.files.in_place)

    def _slot(self, layer: int, e: int, guess: _Guess | None, in_place: bool) -> _Slot:
        """Where expert `e` of a new fetch comes from, first match: flashmoe's cache (a hit), the guess
        already reading it, the page cache through the mapping (`in_place`: a hit), a new read into a cache
        entry (direct mode) or into a pool buffer."""
        key = (layer, e)
        entry = self._cache.get(key)
        if entry is not None:
            self._policy.touch(key)
            if guess is not None:  # cached since it was guessed (prefill batches): the read is not needed
                self._stop(guess)
            entry.pins += 1
            return _Slot(e, entry.buf, entry.read, entry, hit=True)
        if guess is None and in_place and (view := self.files.resident(layer, e)) is not None:
            return _Slot(e, view, _NO_READ, hit=True, mapped=True)
        if self.mode == "direct" and (buf := self._cache_buffer(key)) is not None:
            if guess is None:
                entry = _Entry(buf, self._read(layer, e, buf))
            else:  # the guess's buffer becomes the cache entry; the entry's buffer joins the pool
                entry = _Entry(guess.buf, guess.read)
                self._pool.give(buf)
            self._cache[key] = entry
            self._policy.insert(key)
            entry.pins += 1
            return _Slot(e, entry.buf, entry.read, entry, guessed=guess is not None)
        if guess is not None:
            return _Slot(e, guess.buf, guess.read, guessed=True)
        buf = self._pool.take()
        return _Slot(e, buf, self._read(layer, e, buf))

    def _read(self, layer: int, e: int, buf: np.ndarray) -> Future:
        """Start the demand read of expert `e` into `buf`: one read, or `read_parts` reads of its parts (the
        executor starts them in order, so the first expert's parts run first); the future completes with
        (bytes read, from disk) once all are done, or with the first part's error."""
        if self.read_parts == 1:
            return self._executor.submit(self.files.read, layer, e, buf)
        parts = self.files.parts(layer, self.read_parts)
        whole: Future = Future()
        whole.set_running_or_notify_cancel()
        lock, left, sums, errors = threading.Lock(), [len(parts)], [0, 0], []

        def part_done(read: Future) -> None:  # in the reader thread that finished the part
            err = read.exception()
            with lock:
                if err is not None:
                    errors.append(err)
                else:
                    sums[0] += read.result()[0]
                    sums[1] += read.result()[1]
                left[0] -= 1
                if left[0]:
                    return
            if errors:
                whole.set_exception(errors[0])
            else:
                self.files.parts_done(layer, e, *sums)
                whole.set_result(tuple(sums))

        for part in parts:
            self._executor.submit(self.files.read, layer, e, buf, None, part).add_done_callback(part_done)
        return whole

    def wait(self, f: Fetch) -> list[np.ndarray]:
        """Block until every read of `f` is done; return one read-only np.uint8 array of the layer's expert
        bytes per requested id, in the order of `f.expert_ids`, each starting on a page boundary: a read buffer,
        a direct-mode cache entry, or the expert file's mapping (in place). The time blocked is recorded
        as I/O wait.

        Raises FormatError when a file ends inside a requested expert, FlashMoeError for other read
        errors, ValueError if `f` was already released."""
        if f.released:
            raise ValueError(f"fetch of layer {f.layer} was already released; its buffers were reused")
        # in-place hits (_NO_READ) skip the futures' locks: a decode layer's 8 of them took ~50 us
        reads = [s.read for s in f._slots.values() if s.read is not _NO_READ]
        if reads:
            t0 = time.perf_counter()
            wait_futures(reads)
            self.stats.record_io_wait(time.perf_counter() - t0)
        self._drain_done()
        for read in reads:
            err = read.exception()
            if err is not None:
                self.release(f)
                raise err
        nbytes = self.files.expert_nbytes(f.layer)
        views = {e: _view(s, nbytes) for e, s in f._slots.items()}
        return [views[e] for e in f.expert_ids]

    def as_read(self, f: Fetch) -> Iterator[tuple[int, np.ndarray]]:
        """Each distinct expert of `f` as its read lands: (expert id, its bytes as `wait` returns them), those
        in memory first, then in the order their reads finish, so that the caller can use one (copy it to a
        GPU) while the others are still being read. The time blocked is recorded as I/O wait; once the
        iteration is over, `wait(f)` returns at once. Raises as `wait` (`f` is then released)."""
        if f.released:
            raise ValueError(f"fetch of layer {f.layer} was already released; its buffers were reused")
        nbytes = self.files.expert_nbytes(f.layer)
        pending = list(f._slots.items())
        while pending:
            done = [s.read.done() for _, s in pending]
            if not any(done):
                t0 = time.perf_counter()
                wait_futures([s.read for _, s in pending], return_when=FIRST_COMPLETED)
                self.stats.record_io_wait(time.perf_counter() - t0)
                continue
            ready = [p for p, d in zip(pending, done) if d]
            pending = [p for p, d in zip(pending, done) if not d]
            self._drain_done()
            for e, s in ready:
                err = s.read.exception()
                if err is not None:
                    self.release(f)
                    raise err
                yield e, _view(s, nbytes)

    def report(self, f: Fetch) -> list[ExpertRead]:
        """What `f` did for each distinct expert, in the order of first appearance in `f.expert_ids`:
        hit or miss and the bytes read (see ExpertRead). Call after `wait(f)` (before or after release).
        Raises ValueError if a read of `f` has not finished."""
        out = []
        for e, s in f._slots.items():
            if s.hit:
                out.append(ExpertRead(e, True, 0, 0))
                continue
            if not s.read.done():
                raise ValueError(f"fetch of layer {f.layer}: report() before wait(); expert {e} is still "
                                 "being read")
            nread, disk = s.read.result()
            if self.mode == "direct":
                out.append(ExpertRead(e, False, nread, disk))
            else:
                out.append(ExpertRead(e, disk == 0 if self.files.tells_hits else None, nread, disk))
        return out

    def release(self, f: Fetch) -> None:
        """Give `f`'s buffers back for reuse (idempotent). Pool buffers whose read is still running are
        waited for first; cache entries just lose a pin; mappings stay. Entries whose read failed leave the
        cache."""
        if f.released:
            return
        f.released = True
        del self._live[id(f)]
        pooled = [s.read for s in f._slots.values() if s.entry is None and not s.mapped]
        if pooled:
            wait_futures(pooled)
        for s in f._slots.values():
            if s.mapped:
                continue
            if s.entry is None:
                self._pool.give(s.buf)
                continue
            s.entry.pins -= 1
            key = (f.layer, s.expert)
            if s.read.done() and s.read.exception() is not None and self._cache.get(key) is s.entry:
                self._drop(key)
        self._drain_done()

    def speculate(self, layer: int, expert_ids: Sequence[int], after: Fetch | None = None) -> None:
        """Start reading a guess of the experts `layer` will fetch next (most likely first), into up to
        `guess_slots` read buffers, and return at once; does nothing when `guess_slots` is 0.

        The reads start only once `after`'s reads are done (the engine passes the current layer's fetch,
        so a guess never slows the reads it is waiting for) and go `guess_readers` at a time, in order. The
        next `fetch` of `layer` takes over the guessed experts it asks for, read or still reading, and
        stops the others within one GUESS_CHUNK: a wrong guess costs disk time the demand reads were not
        using, and no cache entry. Ids already in memory (cached, or in the page cache with `in_place`)
        are skipped; earlier guesses are stopped.
        Raises ValueError like `fetch`."""
        if not self.guess_slots:
            return
        ids = self._check_ids(layer, expert_ids)
        self._stop_guesses()
        after_reads = [s.read for s in after._slots.values()] if after is not None else []
        started = 0
        for e in dict.fromkeys(ids):
            if started + len(self._stopped) >= self.guess_slots:
                break
            if (layer, e) in self._cache or (self.in_place and self.files.resident(layer, e) is not None):
                continue
            g = _Guess(self._pool.take(), threading.Event())
            g.read = self._guess_executor.submit(self._guess_read, layer, e, g.buf, g.stop, after_reads)
            self._guesses[(layer, e)] = g
            started += 1
        self.stats.record_guesses(started, 0)

    def _guess_read(self, layer: int, expert: int, buf: np.ndarray, stop: threading.Event,
                    after: list[Future]) -> tuple[int, int]:
        """Worker: a speculative read, started once the demand reads `after` are done."""
        wait_futures(after)
        return self.files.read(layer, expert, buf, stop)

    def _settle_guesses(self, layer: int, ids: tuple[int, ...]) -> dict[int, _Guess]:
        """Take the outstanding guesses of `layer` that `ids` asks for; stop every other one."""
        taken = {}
        for (guess_layer, e), g in self._guesses.items():
            if guess_layer == layer and e in ids:
                taken[e] = g
            else:
                self._stop(g)
        self._guesses.clear()
        self._reap_stopped()
        return taken

    def _stop(self, g: _Guess) -> None:
        g.stop.set()
        if g.read.cancel():  # never started: nothing was read
            self._pool.give(g.buf)
        else:
            self._stopped.append(g)

    def _stop_guesses(self) -> None:
        for g in self._guesses.values():
            self._stop(g)
        self._guesses.clear()
        self._reap_stopped()

    def _reap_stopped(self, wait: bool = False) -> None:
        """Return the buffers of stopped guesses whose read has ended (all of them, with `wait`) to the
        pool, counting what they read as wasted."""
        if wait:
            wait_futures([g.read for g in self._stopped])
        running = []
        for g in self._stopped:
            if not g.read.done():
                running.append(g)
                continue
            self._pool.give(g.buf)
            if g.read.exception() is None:
                self.stats.record_guess_waste(g.read.result()[0])
        self._stopped = running
        self._drain_done()

    def release_all(self) -> None:
        """Release every fetch not yet released and stop every guess (after an interrupted token, or at
        the end of a run)."""
        for f in list(self._live.values()):
            self.release(f)
        self._stop_guesses()

    @property
    def direct(self) -> bool:
        """O_DIRECT really in use (False in pagecache mode, and in direct mode after a fallback)."""
        return self.files.direct

    # --- cache control, accounting, lifetime -----------------------------------------------------
    def set_cache_bytes(self, nbytes: int) -> None:
        """Size the direct-mode cache to `nbytes` (whole entries; pagecache mode has none). load_engine sizes
        it once it has measured what the loaded model takes. Raises ValueError once the cache holds or has
        allocated entries."""
        if self._cache_slots:
            raise ValueError("the expert cache can only be sized before it is first used")
        # More entries than experts on disk would never be used.
        entries = min(nbytes // self.slot_bytes, self.num_experts * len(self.files.layers)) if self.mode == "direct" else 0
        self._capacity = entries
        self._policy = make_policy(self.policy, entries)

    def cached_experts(self) -> list[tuple[int, int]]:
        """(layer, expert) keys now in the direct-mode cache, in insertion order."""
        return list(self._cache)

    @property
    def cache_capacity_bytes(self) -> int:
        """Bytes the direct-mode cache may grow to (whole entries; 0 in pagecache mode)."""
        return self._capacity * self.slot_bytes

    @property
    def cache_bytes(self) -> int:
        """Bytes of direct-mode cache buffers allocated so far (at most the `cache_bytes` asked for);
        pages are committed only when an expert is read into them."""
        return self._cache_slots * self.slot_bytes

    @property
    def allocated_buffer_bytes(self) -> int:
        """Bytes of pool read buffers allocated now (handed out or kept free for reuse)."""
        return self._pool.allocated * self.slot_bytes

    def _drop(self, key: tuple[int, int]) -> None:
        """Take an entry out of the cache, keeping its buffer for the next entry."""
        self._policy.remove(key)
        self._spare.append(self._cache.pop(key).buf)

    def clear_cache(self) -> None:
        """Empty the direct-mode cache, after waiting for reads still running into entries no fetch
        holds, and stopping every guess. Entries held by a live fetch stay."""
        self._stop_guesses()
        self._reap_stopped(wait=True)
        wait_futures([e.read for e in self._cache.values() if e.pins == 0])
        self._drain_done()
        for key in [k for k in self._cache if self._evictable(k)]:
            self._drop(key)

    def evict_page_cache(self) -> int:
        """Drop every expert file's pages from the OS page cache (POSIX_FADV_DONTNEED), for cold-start
        measurements (ExpertFiles.evict_page_cache). Returns the bytes the page cache still holds after
        it, and warns (RuntimeWarning) when that is not 0: a measurement after it is not wholly cold."""
        left = self.files.evict_page_cache()
        if left:
            warnings.warn(f"the page cache kept {left} bytes of the expert files after eviction; reads of them "
                          "will not come from the disk", RuntimeWarning, stacklevel=2)
        return left

    def close(self) -> None:
        """Release every fetch, stop the threads and close the files. Idempotent."""
        self.release_all()
        self._guess_executor.shutdown(wait=True)
        self._reap_stopped()
        self._executor.shutdown(wait=True)
        self.files.close()
        self._drain_done()

    def __enter__(self) -> "ExpertStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
