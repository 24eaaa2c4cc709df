"""Memory sizes and the `--max-memory` budget: parsing sizes, checking that the resident part fits and
computing what is left for the expert cache, and reading the process's resident set size (RSS).

Units are bytes throughout. Size suffixes are binary (K = 1024), whether written `G`, `GB` or `GiB`,
as in `docker --memory` and cgroup limits: `--max-memory 4G` is the same number a cgroup would enforce.
"""

from __future__ import annotations

import gc
import os
import re
import resource
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from flashmoe.errors import FlashMoeError, MemoryBudgetError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """Parse a memory size into bytes.

    Accepts an int (bytes) or a string: a non-negative number, optionally fractional, with an optional
    binary suffix K, M, G, T (also KB/KiB, MB/MiB, ...; case-insensitive; `B` alone means bytes).
    Examples: "4G" -> 4294967296, "512M" -> 536870912, "1.5GB" -> 1610612736, "4096" -> 4096.
    Fractions are rounded down to a whole byte.

    Raises FlashMoeError naming the offending text when it is not a size or is negative.
    """
    if isinstance(value, bool):
        raise FlashMoeError(f"invalid memory size {value!r}: expected bytes or text like '4G', '512M'")
    if isinstance(value, int):
        if value < 0:
            raise FlashMoeError(f"invalid memory size {value}: must not be negative")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise FlashMoeError(
            f"invalid memory size {value!r}: expected a number with an optional unit K, M, G or T "
            "(binary, e.g. '4G', '512M', '1.5GB', or plain bytes)"
        )
    number, unit = m.groups()
    return int(float(number) * _UNITS[unit.upper()])


def format_size(nbytes: float) -> str:
    """Format a byte count for people, binary units: 7077888 -> '6.75 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} TiB"


@dataclass(frozen=True)
class MemoryBudget:
    """What must fit in `--max-memory` (all in bytes).

    The fixed part is everything except the expert cache: resident (non-expert) weights, the KV cache
    (and linear-attention state) at the run's maximum length, the expert read buffers
    (`ExpertStore.read_buffer_bytes`), scratch activations, and `runtime_bytes` — the process's own
    footprint (`current_rss_bytes()`). load_engine estimates it before loading, with the resident weights
    from the manifest (a lower bound, used to refuse at once only a model this machine could not load), and
    checks it after one throwaway forward, with the process as measured then (weights touched, kernels
    loaded) in `runtime_bytes`, so that a refusal names the budget that works.
    The expert cache (direct mode) gets whatever is left. Page-cache pages of experts used in place
    (pagecache mode) are the kernel's, not part of the budget, although they count in RSS while mapped
    (docs/design.md, "Memory accounting of mapped pages").
    """

    max_bytes: int
    resident_bytes: int
    kv_cache_bytes: int = 0
    read_buffer_bytes: int = 0
    scratch_bytes: int = 0
    runtime_bytes: int = 0

    @property
    def fixed_bytes(self) -> int:
        """Bytes that must be resident whatever the expert cache size."""
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "max_bytes")

    def check(self, lower_bound: bool = False) -> int:
        """Return the bytes left for the expert cache (>= 0).

        Raises MemoryBudgetError, with every part listed, when the fixed part alone exceeds `max_bytes`;
        `lower_bound` says the parts are an estimate made before loading, which the loaded process exceeds.
        """
        left = self.max_bytes - self.fixed_bytes
        if left < 0:
            more = " (an estimate before loading: the loaded process needs more)" if lower_bound else ""
            raise MemoryBudgetError(
                f"--max-memory {format_size(self.max_bytes)} cannot hold what must stay resident "
                f"({format_size(self.fixed_bytes)}: {self.describe()}); "
                f"raise --max-memory to at least {format_size(self.fixed_bytes)}{more}"
            )
        return left

    def describe(self) -> str:
        """One line listing the fixed parts that are not zero, e.g. 'resident weights 5.50 GiB + KV cache
        64.00 MiB + ...'."""
        names = {
            "resident_bytes": "resident weights",
            "kv_cache_bytes": "KV cache",
            "read_buffer_bytes": "read buffers",
            "scratch_bytes": "scratch",
            "runtime_bytes": "process (measured)",
        }
        return " + ".join(f"{label} {format_size(getattr(self, name))}" for name, label in names.items()
                          if getattr(self, name))


def physical_memory_bytes() -> int:
    """This machine's physical memory in bytes (sysconf)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cgroup_memory_limit_bytes(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup"),
                              ) -> int | None:
    """The memory limit of this process's cgroup in bytes (a container's `docker --memory`, a systemd unit's
    MemoryMax), or None where there is none, or no cgroups (macOS).

    cgroup v2: `memory.max` ('max' is no limit) of the cgroup named by the `0::PATH` line of `proc_cgroup`,
    under `root`; cgroup v1: `memory.limit_in_bytes` of the memory controller's cgroup, under `root`/memory.
    The cgroups above it count too (a parent's limit bounds its children): the smallest limit applies. In a
    container the process's cgroup is the root of the mount, so the root's own file is read as well. cgroup
    v1 writes "no limit" as a number near 2**63, returned as it is (more than any machine has).
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for hierarchy, controllers, path in (line.split(":", 2) for line in lines if line.count(":") >= 2):
        if hierarchy == "0" and not controllers:
            mount, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            mount, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        cgroup = mount / path.lstrip("/")
        for directory in (d for d in (cgroup, *cgroup.parents) if d.is_relative_to(mount)):
            try:
                value = (directory / name).read_text().strip()
            except OSError:  # not under this mount (a container's own view), or no memory controller there
                continue
            if value.isdigit():
                limits.append(int(value))
    return min(limits, default=None)


def memory_limit() -> tuple[int, str]:
    """The most memory this process can have, in bytes, and what sets it: this machine's physical memory,
    or the cgroup limit of the container or unit it runs in where that is smaller."""
    physical, cgroup = physical_memory_bytes(), cgroup_memory_limit_bytes()
    if cgroup is not None and cgroup < physical:
        return cgroup, "this container's memory limit (cgroup)"
    return physical, "this machine's memory"


def available_memory_bytes() -> int:
    """Memory this machine can give a process now, in bytes: Linux's MemAvailable (/proc/meminfo), else the
    physical memory, which bounds it from above; never more than the cgroup limit (memory_limit)."""
    limit, _ = memory_limit()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(int(line.split()[1]) * 1024, limit)
    except FileNotFoundError:
        pass
    return limit


def check_budget_fits_machine(max_bytes: int) -> None:
    """Refuse a `--max-memory` above this machine's physical memory, or above the cgroup limit of the container
    it runs in (memory_limit): such a budget cannot be kept (the expert cache it sizes would be swapped out,
    or the process killed), so it is a mistake rather than a limit, as vLLM refuses a swap space beyond the
    machine's memory. Raises MemoryBudgetError."""
    limit, what = memory_limit()
    if max_bytes > limit:
        raise MemoryBudgetError(
            f"--max-memory {format_size(max_bytes)} is more than {what} ({format_size(limit)}): "
            "the budget could not be kept (the expert cache it sizes would be swapped out, or the process "
            f"killed); give less than {format_size(limit)}, or leave --max-memory out for no budget"
        )


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes: getrusage's maximum (Linux reports KiB,
    macOS bytes), raised to the current RSS where the two counters disagree by a few pages (Linux syncs
    its per-thread RSS counters lazily)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024
    return max(peak, _statm_rss_bytes() or 0)


def current_rss_bytes() -> int:
    """Current resident set size in bytes, from /proc/self/statm (Linux); where that file does not
    exist (macOS), the peak RSS, which bounds it from above."""
    rss = _statm_rss_bytes()
    return rss if rss is not None else peak_rss_bytes()


def _statm_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except FileNotFoundError:
        return None


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM, since Linux
    4.0); False where that is not possible (macOS), and `window_peak_rss_bytes` then gives the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def window_peak_rss_bytes() -> int:
    """Peak RSS in bytes since `reset_peak_rss` (VmHWM of /proc/self/status), or the current RSS where the
    kernel does not keep it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return current_rss_bytes()


_COLLECTED_FOR: set[str] = set()


def collect_garbage_once(key: str) -> None:
    """A full garbage collection now, the first time this process asks for `key` (a backend name); later
    calls for the same key do nothing. For the moment a backend's decode kernels have just been compiled
    (Engine, after the first eager decode step). Compiling numba kernels leaves hundreds of thousands of
    long-lived Python objects, and CPython's next full collection, which walks every one of them, comes
    once enough of them survived the young generations: soon after, in whatever step is running then. Made
    here, it lands in a step that already spends about a second compiling, and the next one is due only
    after the long-lived objects grew by a quarter. (gc.freeze would make later full collections cheap too,
    but frozen objects are never collected: an engine dropped later, in a reference cycle with its GPU
    memory, would keep it.) Once per key, not per engine: a test process builds hundreds of engines."""
    if key not in _COLLECTED_FOR:
        _COLLECTED_FOR.add(key)
        gc.collect()
