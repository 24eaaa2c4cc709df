"""Disk and page-cache bandwidth for the ExpertStore's own read pattern.

Measures, on one scratch file of `--experts` expert-sized slots laid out like `experts/layer_NNN.bin`:

- cold: expert reads through `ExpertStore` in `pagecache` mode after `posix_fadvise(DONTNEED)` and in
  `direct` mode (O_DIRECT, no own cache), for each thread count T: fetches of T distinct experts at a time,
  all T reads in flight together, fetches one after another (a decode step's pattern with k = T). Every
  expert is read once per measurement, so nothing is served from memory.
- warm: the same fetches once the file is in the page cache (the store's pagecache-mode hit path), and a
  single `preadv` of one expert into a page-aligned buffer vs the same buffer at page offset 16 (where
  np.empty puts large arrays) — the measurement behind the store's aligned buffers.

Bandwidth is in GB/s (1e9 bytes per second). Prints a table and writes JSON (`--json`).
The scratch directory must be on the disk under test, not tmpfs/overlay: the script prints the filesystem
and device it resolved and refuses tmpfs. Run: `python bench/bench_disk.py --json bench_disk.json`.
Caveat for virtual machines: "cold" means not in this guest's page cache; the host may still cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from flashmoe.runtime.memory import format_size, physical_memory_bytes
from flashmoe.format.manifest import ALIGN
from flashmoe.runtime.expert_files import aligned_buffer, slot_bytes
from flashmoe.runtime.store import ExpertStore

DEFAULT_EXPERT_BYTES = 7_077_888  # one Qwen3.5-397B-A17B expert at 4 bits, group 64 (docs: model-shapes.md)


def filesystem_of(path: Path) -> dict[str, str]:
    """Mount point, device and filesystem type holding `path` (longest matching entry of /proc/mounts)."""
    real = str(path.resolve())
    best = {"mountpoint": "", "device": "?", "fstype": "?"}
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, mnt, fstype = line.split()[:3]
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best["mountpoint"]):
                    best = {"mountpoint": mnt, "device": device, "fstype": fstype}
    except FileNotFoundError:
        pass
    return best


def block_device_info(device: str) -> dict[str, str]:
    """Rotational flag, max request size and model of /dev/NAME from sysfs, where present."""
    name = Path(device).name
    info = {}
    for key, rel in (("rotational", "queue/rotational"), ("max_sectors_kb", "queue/max_sectors_kb"),
                     ("model", "device/model")):
        p = Path("/sys/block") / name / rel
        if p.exists():
            info[key] = p.read_text().strip()
    return info


def machine_info() -> dict:
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "memory_bytes": physical_memory_bytes(),
        "python": platform.python_version(),
    }


def make_scratch_file(path: Path, experts: int, stride: int) -> None:
    """Create (or reuse, if the size matches) a file of `experts` slots of random bytes, fsynced so that
    DONTNEED can drop its pages. Random, not zeros: virtual disks may short-cut zero blocks."""
    size = experts * stride
    if path.exists() and path.stat().st_size == size:
        return
    rng = np.random.default_rng(0)
    chunk = rng.integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def store_pass(store: ExpertStore, k: int, order: np.ndarray) -> tuple[float, int]:
    """Read every expert in `order` in fetches of k (all k in flight, fetches serial); (seconds, bytes)."""
    before = store.stats.totals.bytes_read
    t0 = time.perf_counter()
    for i in range(0, len(order), k):
        f = store.fetch(0, order[i : i + k])
        store.wait(f)
        store.release(f)
    return time.perf_counter() - t0, store.stats.totals.bytes_read - before


def measure_store(path: Path, experts: int, stride: int, nbytes: int, mode: str, threads: int,
                  cold: bool, repeats: int, seed: int = 0) -> dict:
    """GB/s of `repeats` full passes over the file through an ExpertStore (median and all runs)."""
    rng = np.random.default_rng(seed)
    runs = []
    with ExpertStore({0: path}, experts, stride, nbytes, mode=mode, threads=threads) as store:
        if not cold:
            store_pass(store, threads, np.arange(experts))  # bring the file into the page cache
        for _ in range(repeats):
            if cold:
                store.evict_page_cache()
            seconds, nread = store_pass(store, threads, rng.permutation(experts))
            runs.append(nread / seconds / 1e9)
        direct = store.direct
        disk_bytes = store.stats.totals.disk_bytes
        bytes_read = store.stats.totals.bytes_read
    return {
        "mode": mode, "o_direct": direct, "cold": cold, "threads": threads, "read_bytes": store.files.read_bytes,
        "reads_per_pass": experts, "gb_s": statistics.median(runs), "gb_s_runs": runs,
        # in pagecache mode: the share of bytes the page cache did not hold (Stats.disk_bytes)
        "disk_fraction": disk_bytes / bytes_read if bytes_read else None,
    }


def measure_alignment(path: Path, experts: int, stride: int, nbytes: int, repeats: int,
                      offset: int = 16) -> dict:
    """Warm page-cache preadv of one expert (median of `repeats` single reads, GB/s), cycling through the
    file's experts so the source is not hot in the CPU caches, into:
    a reused page-aligned buffer (the store's way), the same buffer at page offset `offset`, a reused
    np.empty array, and a fresh page-aligned mmap per read (every page faulted in during the copy)."""
    base = aligned_buffer(slot_bytes(nbytes) + ALIGN)
    np_empty = np.empty(nbytes, dtype=np.uint8)
    buffers = {
        "aligned_reused": lambda: base[:nbytes],
        f"offset_{offset}_reused": lambda: base[offset : offset + nbytes],
        "np_empty_reused": lambda: np_empty,
        "aligned_fresh_mmap": lambda: aligned_buffer(nbytes),
    }
    fd = os.open(path, os.O_RDONLY)
    try:
        for e in range(experts):  # warm the file and the reused buffers
            os.preadv(fd, [memoryview(base)[:nbytes]], e * stride)
        os.preadv(fd, [memoryview(np_empty)], 0)
        result = {"np_empty_page_offset": np_empty.ctypes.data % ALIGN, "gb_s": {}}
        for name, make in buffers.items():
            times = []
            for i in range(repeats):
                view = memoryview(make())
                t0 = time.perf_counter()
                os.preadv(fd, [view], (i % experts) * stride)
                times.append(time.perf_counter() - t0)
            result["gb_s"][name] = nbytes / statistics.median(times) / 1e9
        return result
    finally:
        os.close(fd)


def print_table(report: dict) -> None:
    print(f"\nfile {report['file']} on {report['filesystem']['device']} ({report['filesystem']['fstype']}, "
          f"mounted at {report['filesystem']['mountpoint']}); expert {report['expert_bytes']} B "
          f"(stride {report['stride']}), {report['experts']} experts per pass")
    print(f"{'pattern':<10} {'mode':<10} {'O_DIRECT':<9} {'threads':>7} {'GB/s':>7}  runs")
    for r in report["store"]:
        runs = " ".join(f"{x:.2f}" for x in r["gb_s_runs"])
        print(f"{'cold' if r['cold'] else 'warm':<10} {r['mode']:<10} {str(r['o_direct']):<9} "
              f"{r['threads']:>7} {r['gb_s']:>7.2f}  {runs}")
    a = report["alignment"]
    print(f"\nwarm single preadv of one expert, median GB/s by destination buffer "
          f"(np.empty put it at page offset {a['np_empty_page_offset']}):")
    for name, gb_s in a["gb_s"].items():
        print(f"  {name:<22} {gb_s:7.2f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/flashmoe-bench"),
                    help="scratch directory on the disk under test (default /var/tmp/flashmoe-bench)")
    ap.add_argument("--expert-bytes", type=int, default=DEFAULT_EXPERT_BYTES,
                    help="bytes per expert (default: Qwen3.5-397B-A17B at 4 bits, 7077888)")
    ap.add_argument("--experts", type=int, default=128, help="experts in the scratch file (default 128)")
    ap.add_argument("--threads", default="1,4,10,16",
                    help="comma-separated thread counts (= reads in flight)")
    ap.add_argument("--modes", default="pagecache,direct", help="comma-separated store modes")
    ap.add_argument("--repeats", type=int, default=3, help="passes per measurement; the median is reported")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the scratch file for the next run")
    args = ap.parse_args(argv)

    args.dir.mkdir(parents=True, exist_ok=True)
    fs = filesystem_of(args.dir)
    if fs["fstype"] in ("tmpfs", "ramfs"):
        raise SystemExit(f"{args.dir} is on {fs['fstype']} (memory, not a disk); pass --dir on the disk")
    stride = slot_bytes(args.expert_bytes)
    path = args.dir / "layer_000.bin"
    print(f"scratch file {path}: {format_size(args.experts * stride)} on {fs['device']} ({fs['fstype']})")
    make_scratch_file(path, args.experts, stride)
    threads = [int(t) for t in args.threads.split(",")]
    modes = args.modes.split(",")
    try:
        results = [
            measure_store(path, args.experts, stride, args.expert_bytes, mode, t, cold=True,
                          repeats=args.repeats)
            for mode in modes for t in threads
        ]
        results += [
            measure_store(path, args.experts, stride, args.expert_bytes, "pagecache", t, cold=False,
                          repeats=args.repeats)
            for t in threads
        ]
        alignment = measure_alignment(path, args.experts, stride, args.expert_bytes,
                                      repeats=10 * args.repeats)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    report = {
        "benchmark": "bench_disk",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python bench/bench_disk.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "file": str(path),
        "filesystem": fs,
        "block_device": block_device_info(fs["device"]),
        "expert_bytes": args.expert_bytes,
        "stride": stride,
        "experts": args.experts,
        "store": results,
        "alignment": alignment,
    }
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
