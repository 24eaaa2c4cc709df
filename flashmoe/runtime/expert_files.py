"""The expert files and the reads into buffers: each MoE layer's `experts/layer_NNN.bin` opened for reading
(buffered, or with O_DIRECT), one whole expert read with `preadv`, the page-aligned buffers reads land in,
and, in pagecache mode, a read-only mapping of each file through which an expert the page cache already
holds is used in place (`ExpertFiles.resident`) instead of copied.

Expert `e` of a layer occupies bytes `[e*stride, e*stride + nbytes)` of that layer's file (docs/formats.md);
`stride` is a multiple of 4096, so one read fetches one whole expert and O_DIRECT reads stay aligned.
flashmoe/runtime/store.py decides what to read and where it goes (its cache, its pool, its guesses); this
module only reads (docs/design.md, "The expert store").
"""

from __future__ import annotations

import collections
import ctypes
import errno
import mmap
import os
import sys
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from flashmoe.errors import FlashMoeError, FormatError
from flashmoe.format.manifest import ALIGN  # page size and the O_DIRECT alignment of offsets, lengths, buffers

# Speculative reads (ExpertStore.speculate) go in pieces of this size, so a guess found wrong stops within
# one piece.
GUESS_CHUNK = 1 << 20

# How long `resident` takes an expert it found whole in the page cache, or last handed out, to be there still,
# without asking mincore again: mincore walks every page of the expert (13-65 us for 2.6 MB on the development
# machine, 8 experts a layer, each decode token), while an expert used in the last second sits on pages the
# compute just touched, the last the kernel reclaims. A page reclaimed all the same is read back by the fault that
# needs it (slower, never wrong), as for one reclaimed between a check and the compute.
RESIDENT_RECHECK_S = 1.0

# How many times `evict_page_cache` drops the files' pages before it gives up on the ones the kernel keeps.
EVICT_TRIES = 5

# madvise(MADV_POPULATE_READ) (Linux 5.14; Python's mmap names it from 3.12): map a range's pages in one
# call, as read faults would, reading from disk what the page cache lacks.
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)

# mincore(2), which tells the pages of a mapping that are in memory (Linux, macOS, the BSDs); None elsewhere,
# where pagecache mode copies every expert.
_mincore = getattr(ctypes.CDLL(None, use_errno=True), "mincore", None)
if _mincore is not None:
    _mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    _mincore.restype = ctypes.c_int


def per_layer(value: int | dict[int, int], layers: dict[int, Path]) -> dict[int, int]:
    """`value` for each of `layers`: one int for all, or a dict by layer (which must name every layer)."""
    if isinstance(value, dict):
        missing = sorted(set(layers) - set(value))
        if missing:
            raise ValueError(f"no expert size given for layers {missing}")
        return {layer: value[layer] for layer in layers}
    return dict.fromkeys(layers, value)


def slot_bytes(nbytes: int) -> int:
    """Bytes one read buffer or cache entry takes for an expert of `nbytes`: rounded up to 4096."""
    return -(-nbytes // ALIGN) * ALIGN


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A zeroed, writable np.uint8 array of `nbytes` that starts on a page boundary.

    Anonymous mmap is page-aligned by construction; np.empty puts large arrays at page offset 16, where
    preadv from the page cache measured 4x slower (issue 3). Pages are committed on first write."""
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)


def checked_allocator(allocate: Callable[[int], np.ndarray]) -> Callable[[int], np.ndarray]:
    """Wrap `allocate` so that a buffer O_DIRECT or the alignment measurement would reject fails loudly."""

    def checked(nbytes: int) -> np.ndarray:
        buf = allocate(nbytes)
        if (buf.dtype != np.uint8 or buf.shape != (nbytes,) or not buf.flags.c_contiguous
                or not buf.flags.writeable or buf.ctypes.data % ALIGN):
            raise ValueError(
                f"buffer allocator returned {buf.dtype} {buf.shape} at page offset "
                f"{buf.ctypes.data % ALIGN}; needs a writable contiguous uint8 ({nbytes},) array on a page "
                "boundary"
            )
        return buf

    return checked


class BufferPool:
    """Reusable page-aligned buffers of one size. Buffers are kept for reuse, never unmapped: a fresh
    mapping faults in every page during the copy, which made a warm read ~10x slower (bench_disk.py), and
    the engine's fetch pattern bounds how many ever exist."""

    def __init__(self, size: int, allocate: Callable[[int], np.ndarray]) -> None:
        self.size, self._allocate = size, allocate
        self._free: list[np.ndarray] = []
        self.allocated = 0  # buffers alive (free or handed out)

    def take(self) -> np.ndarray:
        if self._free:
            return self._free.pop()
        self.allocated += 1
        return self._allocate(self.size)

    def give(self, buf: np.ndarray) -> None:
        self._free.append(buf)


class ExpertFiles:
    """The expert files of every MoE layer, open for reading whole experts.

    Args:
        paths: MoE layer index -> path of its `experts/layer_NNN.bin`.
        num_experts, stride, nbytes: as ExpertStore's (a file must hold `num_experts` experts); stride and
            nbytes are one int for every layer or a dict by layer (a GGUF's layers may differ in type).
        mode: "pagecache" (buffered reads, first tried with `RWF_NOWAIT`, which copies only what the page
            cache holds, so a read can tell the bytes that came from disk; an expert whose first page mincore
            finds missing is read as cold, every byte from disk, see `read`) or "direct" (`O_DIRECT`; where
            the filesystem refuses it, e.g. tmpfs, buffered reads with one warning).
        in_place: pagecache mode: `resident` and `mapping` hand out experts the page cache holds as views of
            the file's mapping, without copying them. In pagecache mode every file whose page-cache residency
            the kernel reports (`residency_visible`; not on platforms without mincore) is mapped read-only,
            for mincore to ask about its pages.

    Attributes: `direct` (O_DIRECT really in use), `nowait` (RWF_NOWAIT in use: page-cache hits can be told),
    `nbytes` (the largest layer's expert bytes: what a read buffer must hold), `read_bytes` (bytes asked of
    that layer's read: nbytes, or rounded up to 4096 for O_DIRECT), `finished` (a deque
    of (bytes read, of them from disk, demand read?) per finished read: reader threads append, the store's
    thread drains it into its Stats, so Stats needs no lock).

    A mapped file must not shrink while it is open: touching a mapped page past the new end kills the
    process with SIGBUS (as for the resident weights, which are memory-mapped too). Expert files are never
    written once converted.

    Raises FormatError if a file is missing or too short to hold `num_experts` experts.
    """

    def __init__(self, paths: dict[int, Path], num_experts: int, stride: int | dict[int, int],
                 nbytes: int | dict[int, int], mode: str, in_place: bool = False) -> None:
        self.num_experts, self.mode = num_experts, mode
        self._stride, self._nbytes = per_layer(stride, paths), per_layer(nbytes, paths)
        self.nbytes = max(self._nbytes.values(), default=0)
        self.in_place = in_place and mode == "pagecache" and _mincore is not None
        self._maps: dict[int, mmap.mmap] = {}
        self._mapped: dict[int, np.ndarray] = {}  # layer -> its whole file, read-only: mincore's, in-place use
        self._checked: dict[tuple[int, int], float] = {}  # (layer, expert) found whole -> when (monotonic s)
        # maps what the reads bring in (_map_in); FIFO on one thread, so the last future is the last done
        self._populate = self.in_place and _POPULATE_READ is not None
        self._mapper = ThreadPoolExecutor(1, thread_name_prefix="flashmoe-map") if self._populate else None
        self._last_mapped: Future | None = None
        # Buffered reads need only the expert; O_DIRECT needs an aligned length (the file's end may cut the
        # last expert's read short, which is fine as long as nbytes arrive).
        self._read_bytes = {layer: slot_bytes(n) if mode == "direct" else n for layer, n in self._nbytes.items()}
        self.read_bytes = max(self._read_bytes.values(), default=0)
        self._paths = {layer: Path(p) for layer, p in paths.items()}
        self._fds: dict[int, int] = {}
        self.direct = False  # O_DIRECT really in use (False after a fallback)
        self.nowait = mode == "pagecache" and hasattr(os, "RWF_NOWAIT")
        self.finished: collections.deque[tuple[int, int, bool]] = collections.deque()
        try:
            self._open_files()
        except BaseException:
            self.close()
            raise

    @property
    def tells_hits(self) -> bool:
        """Whether every read is known to be a page-cache hit or a miss: RWF_NOWAIT tells the bytes that came
        from disk; where every file is mapped, mincore tells the pages the page cache holds."""
        return self.nowait or (bool(self._fds) and len(self._maps) == len(self._fds))

    @property
    def layers(self) -> list[int]:
        """The MoE layers with an expert file, ascending."""
        return sorted(self._fds)

    def _open_files(self) -> None:
        fallback = []
        for layer, path in sorted(self._paths.items()):
            stride, nbytes = self._stride[layer], self._nbytes[layer]
            need = (self.num_experts - 1) * stride + nbytes
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise FormatError(f"{path}: expert file of layer {layer} is missing") from None
            if size < need:
                first_short = max(0, (size - nbytes) // stride + 1)
                raise FormatError(
                    f"{path}: {size} bytes is too short for {self.num_experts} experts of {nbytes} "
                    f"bytes at stride {stride} (needs {need}); expert {first_short} is cut off"
                )
            fd = self._open_direct(path) if self.mode == "direct" else None
            if fd is None:
                if self.mode == "direct":
                    fallback.append(path)
                fd = os.open(path, os.O_RDONLY)
                # Experts are read whole and at random: kernel readahead past one would spend disk bandwidth
                # on a neighbour the router may never pick.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            self._fds[layer] = fd
            if self.mode == "pagecache" and _mincore is not None and residency_visible(path):
                self._map(layer, fd, size)
        self.direct = self.mode == "direct" and not fallback
        if fallback:
            warnings.warn(
                f"O_DIRECT is not supported for {fallback[0]}"
                + (f" and {len(fallback) - 1} other expert files" if len(fallback) > 1 else "")
                + "; direct mode reads them through the page cache instead (flashmoe's own cache still "
                "applies, but the page cache will also hold experts)",
                RuntimeWarning,
                stacklevel=4,
            )

    @staticmethod
    def _open_direct(path: Path) -> int | None:
        """An O_DIRECT descriptor for `path`, or None where the filesystem refuses O_DIRECT (EINVAL at
        open on tmpfs; some filesystems accept the flag and refuse the first read, hence the probe)."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | flag)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return None
            raise
        try:
            os.preadv(fd, [aligned_buffer(ALIGN)], 0)
        except OSError as e:
            os.close(fd)
            if e.errno == errno.EINVAL:
                return None
            raise
        return fd

    def _map(self, layer: int, fd: int, size: int) -> None:
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_RANDOM"):
            # A page reclaimed between `resident` and the compute faults in alone, not with its neighbours.
            mm.madvise(mmap.MADV_RANDOM)
        self._maps[layer] = mm
        self._mapped[layer] = np.frombuffer(mm, dtype=np.uint8)

    def expert_nbytes(self, layer: int) -> int:
        """Bytes of one expert of `layer`."""
        return self._nbytes[layer]

    def mapping(self, layer: int) -> np.ndarray | None:
        """`layer`'s whole expert file as a read-only np.uint8 array on its mapping, for in-place use; None where
        not mapped or not `in_place`."""
        return self._mapped.get(layer) if self.in_place else None

    def resident(self, layer: int, expert: int) -> np.ndarray | None:
        """Expert `expert` of `layer` as a read-only np.uint8 view of `nbytes` on the file's mapping when the
        page cache holds every page of it, else None (the caller reads it): `residents` of one expert."""
        found = self.residents(layer, (expert,))
        return None if found is None else found[0]

    def residents(self, layer: int, experts) -> list[np.ndarray] | None:
        """Experts `experts` (ints) of `layer` as read-only np.uint8 views of `nbytes` on the file's mapping when
        the page cache holds every page of every one of them (mincore; an expert found whole or handed out less
        than RESIDENT_RECHECK_S ago is not asked about again), else None, at the first one it lacks. A page
        reclaimed after the check is read back from disk by the page fault that needs it. One clock reading
        and one set of lookups for a decode layer's k experts. Raises FlashMoeError naming the file when
        mincore fails."""
        whole = self._mapped.get(layer) if self.in_place else None
        if whole is None:
            return None
        stride, nbytes, checked = self._stride[layer], self._nbytes[layer], self._checked
        now = time.monotonic()
        views = []
        for expert in experts:
            off = expert * stride
            if now - checked.get((layer, expert), -RESIDENT_RECHECK_S) >= RESIDENT_RECHECK_S:
                if not self._resident_pages(layer, off, off + nbytes).all():
                    return None
            views.append(whole[off : off + nbytes])
        for expert in experts:  # all found: each about to be used, its pages touched now
            checked[(layer, expert)] = now
        return views

    def _resident_pages(self, layer: int, lo: int, hi: int) -> np.ndarray:
        """Whether the page cache holds each page of bytes [lo, hi) of `layer`'s file (mapped): bool [pages, from
        the one holding byte lo]. Raises FlashMoeError naming the file when mincore fails."""
        start = lo - lo % mmap.PAGESIZE  # mincore takes whole pages (16 KiB on Apple silicon)
        pages = np.empty(-(-(hi - start) // mmap.PAGESIZE), np.uint8)
        failed = _mincore(self._mapped[layer].ctypes.data + start, hi - start, pages.ctypes.data)
        if failed:
            raise FlashMoeError(f"{self._paths[layer]}: mincore of bytes [{lo}, {hi}) of layer {layer}'s expert file "
                                f"failed: {os.strerror(ctypes.get_errno())}")
        return np.bitwise_and(pages, 1).astype(bool)  # bit 0: in memory; the others are reserved

    def _map_in(self, layer: int, expert: int) -> None:
        """Map the pages of `expert` of `layer` that a read just brought into the page cache (on the mapper
        thread), so that its next use in place neither faults on the compute threads (one fault per 64 KiB,
        ~0.25 ms of CPU per 2.6 MB expert; docs/benchmarks.md, "Decode on every core, third pass") nor
        waits for mincore's slow walk of unmapped pages. Turns itself off where the kernel lacks it."""
        mm = self._maps.get(layer)
        try:
            # a page reclaimed since the read would be read from disk again: a page cache churning through
            # a model larger than memory maps only what is still whole
            if mm is None or self.resident(layer, expert) is None:
                return
        except FlashMoeError:
            return
        off, nbytes = expert * self._stride[layer], self._nbytes[layer]
        start = off - off % mmap.PAGESIZE
        try:
            mm.madvise(_POPULATE_READ, start, off + nbytes - start)
        except OSError:  # EINVAL: a kernel before 5.14
            self._populate = False
        except ValueError:  # closed meanwhile
            return
        else:
            self._checked[(layer, expert)] = time.monotonic()

    def close(self) -> None:
        """Close every file and mapping. Idempotent. A view that `resident` handed out and that is still
        alive keeps its mapping until it is freed."""
        if self._mapper is not None:
            self._mapper.shutdown(wait=True, cancel_futures=True)  # mappings not yet made are not needed
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._mapped.clear()
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # views are alive: the mapping is unmapped with the last of them
        self._maps.clear()

    def read(self, layer: int, expert: int, buf: np.ndarray, stop: threading.Event | None = None,
             part: tuple[int, int] | None = None) -> tuple[int, int]:
        """Read one expert into `buf` (from a reader thread; preadv releases the GIL). Returns
        (bytes read, of them from disk), also queued in `finished`. With `stop` (a speculative read) the
        read goes in GUESS_CHUNK pieces and ends early, incomplete, once `stop` is set. With `part`
        ((start, end) from :meth:`parts`) only those bytes of the expert are read, and nothing is queued:
        the caller queues the whole expert's read once every part is done (:meth:`parts_done`)."""
        fd, off, length = self._fds[layer], expert * self._stride[layer], self._read_bytes[layer]
        start, end = (0, length) if part is None else part
        want = min(end, self._nbytes[layer])  # the expert's bytes end at nbytes (direct reads round up)
        view = memoryview(buf)[:length]
        piece = length if stop is None else GUESS_CHUNK
        # RWF_NOWAIT copies what the page cache holds, but its try also starts the reads of the pages it lacks
        # and returns them too where the device answers first (a small expert, a fast disk): an expert whose
        # first page the page cache lacks (mincore, where the file is mapped) is read as cold, every byte from disk.
        cold = layer in self._maps and not self._resident_pages(layer, off + start, off + start + 1)[0]
        done = start
        try:
            if self.nowait and not cold:
                try:
                    done += os.preadv(fd, [view[start:end]], off + start, os.RWF_NOWAIT)
                except BlockingIOError:
                    pass  # nothing of it is in the page cache
                except OSError as e:
                    if e.errno != errno.EOPNOTSUPP:
                        raise
                    self.nowait = False  # the filesystem cannot tell; count every byte as from disk
            cached = done - start
            while done < want:
                if stop is not None and stop.is_set():
                    if done:
                        self.finished.append((done, done - cached, False))
                    return done, done - cached
                n = os.preadv(fd, [view[done : min(done + piece, end)]], off + done)
                # O_DIRECT only returns a partial block at the end of the file.
                if n == 0 or (self.direct and n % ALIGN):
                    done += n
                    break
                done += n
        except OSError as e:
            raise FlashMoeError(
                f"{self._paths[layer]}: reading expert {expert} of layer {layer} failed: {e}"
            ) from e
        if done < want:
            raise FormatError(
                f"{self._paths[layer]}: expert {expert} of layer {layer} needs bytes [{off}, "
                f"{off + self._nbytes[layer]}) but the file ends at byte {off + done}"
            )
        nread = done - start
        if part is None:
            self.parts_done(layer, expert, nread, nread - cached, demand=stop is None)
        return nread, nread - cached

    def parts(self, layer: int, n: int) -> list[tuple[int, int]]:
        """An expert of `layer` cut into at most n consecutive parts for :meth:`read`, each a multiple of
        ALIGN bytes but the last."""
        length = self._read_bytes[layer]
        step = -(-length // (n * ALIGN)) * ALIGN
        return [(a, min(a + step, length)) for a in range(0, length, step)]

    def parts_done(self, layer: int, expert: int, nread: int, disk: int, demand: bool = True) -> None:
        """A whole read of `expert` is done (`nread` bytes, `disk` of them from the device; `demand`: not a
        speculative one): queued in `finished`, and mapped in where the mapping is populated."""
        self.finished.append((nread, disk, demand))
        if self._populate and layer in self._maps:
            self._last_mapped = self._mapper.submit(self._map_in, layer, expert)

    def evict_page_cache(self) -> int:
        """Drop every expert file's pages from the OS page cache (POSIX_FADV_DONTNEED), for cold-start
        measurements. Clean pages only; the files are never written, so that is all of them. The kernel
        keeps pages a process has mapped, so this process's mappings let go of theirs first
        (MADV_DONTNEED on a file mapping: the pages leave the page tables, the file is untouched), and
        `resident` asks mincore again about every expert. Mappings still being made finish first.

        The kernel also passes over a page it holds for a moment (being read, migrated, or in another CPU's
        LRU batch), so where it tells residency (`residency_visible`, mincore) the files are asked about
        afterwards and the eviction tried again, up to EVICT_TRIES times in all. Returns the bytes of the
        files still in the page cache then (0 where the kernel does not tell)."""
        if self._last_mapped is not None:
            self._last_mapped.result()
        self._checked.clear()
        left = 0
        for attempt in range(EVICT_TRIES):
            if attempt:
                time.sleep(0.01 * attempt)
            for mm in self._maps.values():
                mm.madvise(mmap.MADV_DONTNEED)
            for fd in self._fds.values():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            left = sum(int(self._resident_pages(layer, 0, len(whole)).sum()) * mmap.PAGESIZE
                       for layer, whole in self._mapped.items())
            if not left:
                break
        return left


def residency_visible(path: Path) -> bool:
    """Whether mincore tells which of `path`'s pages are in the page cache. Linux (since 5.0) tells it only
    for files the process owns or may write, and reports every page as present for the others, to close a
    side channel (mm/mincore.c, can_do_mincore): experts of such files are always read."""
    if os.stat(path).st_uid == os.geteuid():
        return True
    return os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids)
