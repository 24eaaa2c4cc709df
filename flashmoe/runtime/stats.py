"""Run statistics shared by the expert store and the engine: I/O counters, compute time per stage,
per-token records, tok/s, time to first token and peak RSS.

One `Stats` object lives as long as its engine: one run for `flashmoe generate`, every request for a server.
The ExpertStore adds I/O counters to it (all from the engine's thread, so no locking is needed); the engine
adds compute time per stage and marks each emitted token. A run starts with `start()` and its first
`token_done()` gives its time to first token; the figures over all runs come from running sums, and only
the most recent token records are kept (`window`), so a long-running server's statistics stay bounded.
`summary()` is what `--stats` prints, `to_dict()` what `--stats-json` writes.

Definitions (units are bytes and seconds unless a name says otherwise):
- `bytes_read`: bytes copied into read buffers by `preadv` (page cache or disk). An expert used in place
  (pagecache mode, through the file's mapping) is a hit with no read and no bytes read.
- `disk_bytes`: the part of `bytes_read` that was not in memory when asked for: in direct mode every byte
  read (O_DIRECT bypasses the page cache); in pagecache mode the bytes a non-blocking `RWF_NOWAIT` read could
  not get from the page cache, every byte of an expert whose first page mincore found missing before the
  read (ExpertFiles.read), and every byte where neither is available. This is the numerator of the
  disk-bound ceiling.
- `reads`: expert reads performed (one per expert not found in flashmoe's own cache).
- `hits` / `misses`: lookups of whole experts. In direct mode, flashmoe's own cache; in pagecache mode, the
  OS page cache (a hit is an expert whose every byte was already cached, used in place or copied; not
  counted where neither RWF_NOWAIT nor the mapping tells, so the hit rate is then n/a).
- `io_wait_s`: time the engine was blocked in `ExpertStore.wait()` — I/O that compute did not hide.
- `guesses` / `guesses_used`: speculative expert reads started (`ExpertStore.speculate`, the next layer's
  experts guessed during this one) and those a fetch then took over; `guess_wasted_bytes`: bytes the other
  guesses read before they were stopped. Speculative reads count in `reads`, `bytes_read` and `disk_bytes`.
- `compile_s`: time numba spent compiling kernels (CPU or CUDA) during the run: a machine's first use of a
  kernel for some shapes or dtypes (later runs load it from numba's cache). Like llama.cpp's load time it is
  kept out of the stage times and the decode tok/s; the time to first token, what the user waited, includes it.
- stage times: compute time the engine attributes to named stages (`attention`, `experts`, ...).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field

from flashmoe.runtime.memory import current_rss_bytes, format_size, peak_rss_bytes

# Token records a Stats keeps (at most twice this many between trims): ~0.5 KB each.
TOKEN_WINDOW = 8192

_compile_timer = None


def compile_seconds() -> float:
    """Seconds this process has spent compiling numba kernels (numba's "numba:compile" events, nested ones
    counted once), from the first call made after numba was imported; 0 while numba is not imported (a
    backend that compiles imports it before its engine runs)."""
    global _compile_timer
    if _compile_timer is None:
        if "numba" not in sys.modules:
            return 0.0
        from numba.core import event

        _compile_timer = event.TimingListener()
        event.register("numba:compile", _compile_timer)
    return _compile_timer.duration if _compile_timer.done else 0.0


class _Stage:
    """Stats.stage's timer: a plain class, not a generator-based context manager, which cost several times as
    much at the engine's 5 stages a decode layer (docs/benchmarks.md, "fourth pass")."""

    __slots__ = ("stats", "name", "t0", "compiled")

    def __init__(self, stats: Stats, name: str):
        self.stats, self.name = stats, name

    def __enter__(self) -> None:
        self.t0, self.compiled = time.perf_counter(), compile_seconds()

    def __exit__(self, *exc) -> None:
        self.stats.add_stage_time(self.name, time.perf_counter() - self.t0 - (compile_seconds() - self.compiled))


@dataclass
class Counters:
    """Additive I/O and time counters; one instance per run and one delta per token."""

    bytes_read: int = 0
    disk_bytes: int = 0
    reads: int = 0
    hits: int = 0
    misses: int = 0
    io_wait_s: float = 0.0
    compute_s: float = 0.0
    guesses: int = 0
    guesses_used: int = 0
    guess_wasted_bytes: int = 0
    compile_s: float = 0.0

    def __sub__(self, other: "Counters") -> "Counters":
        return Counters(**{k: v - getattr(other, k) for k, v in asdict(self).items()})

    def __add__(self, other: "Counters") -> "Counters":
        return Counters(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def __truediv__(self, n: float) -> "Counters":
        return Counters(**{k: v / n for k, v in asdict(self).items()})

    @property
    def hit_rate(self) -> float | None:
        """Fraction of expert lookups served from memory; None before any lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else None


@dataclass
class TokenRecord:
    """One emitted token: the counters spent on it and its wall time since the previous token (or since
    the run started, for a run's first token, which includes prefill: `first`)."""

    wall_s: float
    counters: Counters
    first: bool = False


@dataclass
class Stats:
    """Statistics of an engine's runs. `num_layers` (MoE layers per token) turns totals into ms per layer.

    `tokens` holds the most recent token records: between `window` and twice `window` once that many were
    recorded (trimmed in batches, so appending stays O(1)); `token_count` counts every token."""

    num_layers: int = 0
    totals: Counters = field(default_factory=Counters)
    stage_s: dict[str, float] = field(default_factory=dict)
    tokens: list[TokenRecord] = field(default_factory=list)
    window: int = TOKEN_WINDOW
    token_count: int = field(default=0, init=False)
    runs: int = field(default=0, init=False)  # runs that emitted a first token
    last_ttft_s: float | None = field(default=None, init=False)
    ttft_sum_s: float = field(default=0.0, init=False)
    decode_tokens: int = field(default=0, init=False)  # tokens after a run's first
    decode_wall_s: float = field(default=0.0, init=False)
    decode_counters: Counters = field(default_factory=Counters, init=False)
    _t_last: float | None = field(default=None, init=False, repr=False)
    _at_last_token: Counters = field(default_factory=Counters, init=False, repr=False)
    _first_pending: bool = field(default=True, init=False, repr=False)
    _compiled_before: float = field(default=0.0, init=False, repr=False)  # compile_seconds() when last counted

    # --- recorded by the ExpertStore -------------------------------------------------------------
    def record_lookups(self, hits: int, misses: int) -> None:
        """Count whole-expert cache lookups."""
        self.totals.hits += hits
        self.totals.misses += misses

    def record_read(self, nbytes: int, disk_bytes: int) -> None:
        """Count one completed expert read of `nbytes`, of which `disk_bytes` came from the device."""
        self.totals.reads += 1
        self.totals.bytes_read += nbytes
        self.totals.disk_bytes += disk_bytes

    def record_guesses(self, started: int, used: int) -> None:
        """Count speculative reads started and guesses taken over by a fetch."""
        self.totals.guesses += started
        self.totals.guesses_used += used

    def record_guess_waste(self, nbytes: int) -> None:
        """Count bytes a stopped (wrong) guess read."""
        self.totals.guess_wasted_bytes += nbytes

    def record_io_wait(self, seconds: float) -> None:
        """Add time the engine spent blocked waiting for expert reads."""
        self.totals.io_wait_s += seconds

    # --- recorded by the engine ------------------------------------------------------------------
    def start(self) -> None:
        """Mark the start of a run (the prompt was submitted, before any of its prefill); its time to first
        token counts from here."""
        self._t_last = time.perf_counter()
        self._at_last_token = Counters(**asdict(self.totals))
        self._first_pending = True
        self._compiled_before = compile_seconds()

    def add_stage_time(self, name: str, seconds: float) -> None:
        """Add compute time to stage `name`."""
        self.stage_s[name] = self.stage_s.get(name, 0.0) + seconds
        self.totals.compute_s += seconds

    def stage(self, name: str) -> _Stage:
        """A context manager timing the enclosed block as compute of stage `name`, less the kernel compilation
        done in it."""
        return _Stage(self, name)

    def token_done(self) -> None:
        """Mark one emitted token: records its counters and wall time. The first call after `start()` is
        the run's time to first token (prefill included)."""
        now = time.perf_counter()
        if self._t_last is None:
            self.start()
        compiled = compile_seconds()
        self.totals.compile_s += compiled - self._compiled_before
        self._compiled_before = compiled
        snapshot = Counters(**asdict(self.totals))
        record = TokenRecord(now - self._t_last, snapshot - self._at_last_token, first=self._first_pending)
        self._t_last, self._at_last_token, self._first_pending = now, snapshot, False
        self.token_count += 1
        if record.first:
            self.runs += 1
            self.last_ttft_s = record.wall_s
            self.ttft_sum_s += record.wall_s
        else:
            self.decode_tokens += 1
            self.decode_wall_s += record.wall_s
            self.decode_counters = self.decode_counters + record.counters
        self.tokens.append(record)
        if len(self.tokens) > 2 * self.window:
            del self.tokens[: len(self.tokens) - self.window]

    # --- derived figures -------------------------------------------------------------------------
    @property
    def ttft_s(self) -> float | None:
        """The latest run's time to first token in seconds (prefill included), None before a first token."""
        return self.last_ttft_s

    @property
    def mean_ttft_s(self) -> float | None:
        """Mean time to first token over every run, None before a first token."""
        return self.ttft_sum_s / self.runs if self.runs else None

    @property
    def decode_tok_s(self) -> float | None:
        """Decode speed in tokens per second over every run's tokens after its first (which carries
        prefill), kernel compilation not counted."""
        seconds = self.decode_wall_s - self.decode_counters.compile_s
        return self.decode_tokens / seconds if self.decode_tokens and seconds > 0 else None

    def per_token_mean(self) -> Counters | None:
        """Mean counters per decode token (every run's tokens after its first); None if there are none."""
        return self.decode_counters / self.decode_tokens if self.decode_tokens else None

    def ms_per_layer(self) -> dict[str, float] | None:
        """Decode ms per MoE layer per token split into compute and I/O wait; None without decode tokens
        or without `num_layers`."""
        mean = self.per_token_mean()
        if mean is None or not self.num_layers:
            return None
        return {
            "compute": 1e3 * mean.compute_s / self.num_layers,
            "io_wait": 1e3 * mean.io_wait_s / self.num_layers,
        }

    def to_dict(self) -> dict:
        """JSON-ready dictionary: totals, derived figures, stage times and the kept token records
        (`per_token`: the last `len(self.tokens)` of `tokens`; `first` marks a run's first token)."""
        mean, current = self.per_token_mean(), current_rss_bytes()
        return {
            "tokens": self.token_count,
            "runs": self.runs,
            "ttft_s": self.ttft_s,
            "mean_ttft_s": self.mean_ttft_s,
            "decode_tok_s": self.decode_tok_s,
            "num_layers": self.num_layers,
            "ms_per_layer": self.ms_per_layer(),
            "hit_rate": self.totals.hit_rate,
            "totals": asdict(self.totals),
            "per_decode_token": asdict(mean) if mean else None,
            "stage_s": dict(self.stage_s),
            "peak_rss_bytes": max(peak_rss_bytes(), current),  # read after it: the process may have grown since
            "current_rss_bytes": current,
            "per_token": [{"wall_s": t.wall_s, "first": t.first, **asdict(t.counters)} for t in self.tokens],
        }

    def summary(self) -> str:
        """A few human-readable lines for `--stats`."""
        t = self.totals
        lines = [f"tokens: {self.token_count}" + (f" in {self.runs} runs" if self.runs > 1 else "")]
        if self.ttft_s is not None:
            over = f" (last run; mean {self.mean_ttft_s:.3f} s over {self.runs})" if self.runs > 1 else ""
            lines.append(f"time to first token: {self.ttft_s:.3f} s{over}")
        if t.compile_s:
            lines.append(f"kernel compilation: {t.compile_s:.3f} s (numba: a kernel's first use on this machine, "
                         "cached for later runs; not counted in tok/s or the stage times)")
        if self.decode_tok_s is not None:
            lines.append(f"decode: {self.decode_tok_s:.2f} tok/s")
        ms = self.ms_per_layer()
        if ms is not None:
            lines.append(f"per layer: {ms['compute']:.2f} ms compute + {ms['io_wait']:.2f} ms I/O wait")
        mean = self.per_token_mean()
        if mean is not None and not mean.reads:  # every expert in memory: flashmoe's cache, the page cache, the GPU's
            lines.append("per decode token: no expert reads")
        elif mean is not None:  # three significant digits: a read every 30 tokens is 0.0333, not "0.0 reads"
            lines.append(
                f"per decode token: {format_size(mean.bytes_read)} read ({format_size(mean.disk_bytes)} "
                f"from disk) in {mean.reads:.3g} reads"
            )
        hr = t.hit_rate
        lines.append(
            f"expert reads: {t.reads} ({format_size(t.bytes_read)}, {format_size(t.disk_bytes)} from disk); "
            f"hit rate: {'n/a' if hr is None else f'{100 * hr:.1f}%'}; I/O wait {t.io_wait_s:.3f} s"
        )
        if t.guesses:
            lines.append(
                f"speculation: {t.guesses} guesses, {t.guesses_used} used "
                f"({100 * t.guesses_used / t.guesses:.0f}%), {format_size(t.guess_wasted_bytes)} read in vain"
            )
        if self.stage_s:
            lines.append("compute: " + ", ".join(f"{k} {v:.3f} s" for k, v in sorted(self.stage_s.items())))
        lines.append(f"peak RSS: {format_size(peak_rss_bytes())}")
        return "\n".join(lines)
