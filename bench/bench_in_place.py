"""Experts already in memory: copied or used in place (issue 14, item 6), and cold experts: read or faulted in.

    python -m flashmoe.bench.bench_in_place MODEL_DIR [--layer 0] [--experts 32] [--rounds 3]

One expert file of a model directory; per expert, the CPU time one thread spends to have the expert's
bytes in memory and read them once (one pass of 64-bit loads, the least any kernel does with them):

- warm (the file in the page cache): `copy` = the store's read of a page-cache hit (preadv into a
  page-aligned buffer) + a pass over the buffer; `in place, first use` = ExpertFiles.resident (mincore)
  + a pass over the mapping, whose page faults map the pages; `in place` = the same once mapped.
  Each variant runs over all `--experts` experts before the next (more bytes than the CPU caches hold),
  so every pass reads memory, not a cache.
- cold (the file evicted from the page cache before each round): `preadv` (the store's miss path) + a
  pass, and a pass over a mapping that faults the expert in from disk, with MADV_NORMAL (kernel
  readahead) or MADV_RANDOM (one page per fault), and MADV_WILLNEED on the expert's range first.
  Experts take the variants in turn (expert i gets variant i mod 4), so load changes hit all alike.

Prints the median µs (warm) or ms (cold) per expert and the rate in GB/s, and the load average.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from flashmoe.format.modeldir import ModelDir
from flashmoe.runtime.expert_files import ExpertFiles, aligned_buffer


def _pass(a: np.ndarray) -> int:
    return int(a[: a.size // 8 * 8].view(np.uint64).sum())


def _timed(fn: Callable[[int], object], experts: list[int]) -> list[float]:
    out = []
    for e in experts:
        t0 = time.perf_counter()
        fn(e)
        out.append(time.perf_counter() - t0)
    return out


def warm(path: Path, num_experts: int, stride: int, nbytes: int, experts: list[int], rounds: int) -> dict:
    buf = aligned_buffer(stride)
    times: dict[str, list[float]] = {"copy": [], "in place, first use": [], "in place": []}
    for _ in range(rounds):
        files = ExpertFiles({0: path}, num_experts, stride, nbytes, "pagecache", in_place=True)
        try:
            for e in experts:  # the whole sample into the page cache
                files.read(0, e, buf)
            times["copy"] += _timed(lambda e: (files.read(0, e, buf), _pass(buf[:nbytes])), experts)
            for name in ("in place, first use", "in place"):  # a fresh mapping: the first pass faults
                times[name] += _timed(lambda e: _pass(files.resident(0, e)), experts)
        finally:
            files.close()
    return times


def cold(path: Path, stride: int, nbytes: int, experts: list[int], rounds: int) -> dict:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # as the store opens expert files
    buf = aligned_buffer(stride)
    maps = {"normal": mmap.mmap(fd, 0, access=mmap.ACCESS_READ), "random": mmap.mmap(fd, 0, access=mmap.ACCESS_READ)}
    maps["random"].madvise(mmap.MADV_RANDOM)
    arrays = {k: np.frombuffer(m, np.uint8) for k, m in maps.items()}

    def willneed(e: int) -> int:
        maps["random"].madvise(mmap.MADV_WILLNEED, e * stride, stride)
        return _pass(arrays["random"][e * stride : e * stride + nbytes])

    variants: dict[str, Callable[[int], object]] = {
        "preadv (the store's miss path)": lambda e: (os.preadv(fd, [memoryview(buf)[:nbytes]], e * stride),
                                                     _pass(buf[:nbytes])),
        "fault in, MADV_NORMAL": lambda e: _pass(arrays["normal"][e * stride : e * stride + nbytes]),
        "fault in, MADV_RANDOM": lambda e: _pass(arrays["random"][e * stride : e * stride + nbytes]),
        "MADV_WILLNEED, then fault in": willneed,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for r in range(rounds):
            for m in maps.values():
                m.madvise(mmap.MADV_DONTNEED)  # mapped pages would survive the eviction
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            names = list(variants)
            for i, e in enumerate(experts):
                name = names[(i + r) % len(names)]
                times[name] += _timed(variants[name], [e])
    finally:
        del arrays
        for m in maps.values():
            m.close()
        os.close(fd)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--layer", type=int, default=None, help="MoE layer (default: the first)")
    ap.add_argument("--experts", type=int, default=32, help="experts per round, spread over the file")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    model = ModelDir.open(args.model)
    layer = model.moe_layers[0] if args.layer is None else args.layer
    path, layout, n = model.expert_path(layer), model.layout, model.config.num_experts
    experts = [int(e) for e in np.linspace(0, n - 1, min(args.experts, n)).round()]
    print(f"{path}: {len(experts)} experts of {layout.nbytes} bytes, {args.rounds} rounds; "
          f"load average {os.getloadavg()[0]:.1f}")
    for label, unit, times in (("warm", 1e6, warm(path, n, layout.stride, layout.nbytes, experts, args.rounds)),
                               ("cold", 1e3, cold(path, layout.stride, layout.nbytes, experts, args.rounds))):
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{label} {name:32s} {med * unit:9.1f} {'µs' if unit == 1e6 else 'ms'} per expert "
                  f"({layout.nbytes / med / 1e9:5.2f} GB/s, n={len(ts)})")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
