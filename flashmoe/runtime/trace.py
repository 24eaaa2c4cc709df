"""Routing traces: what the router and the expert store did for each token in each MoE layer, as JSON
Lines (docs/formats.md, "Routing trace").

Line 1 is a header object, every further line one token:

    {"format": "flashmoe-routing-trace", "version": 1, "model": "...", "num_experts": 512,
     "experts_per_token": 4, "moe_layers": [0, 1, 2, 3], "io": "pagecache", "expert_bytes": 7077888}
    {"pos": 0, "token": 9707, "experts": [[17, 3, 250, 8], ...], "weights": [[0.41, 0.22, 0.2, 0.17], ...],
     "hit": [[false, true, true, false], ...], "bytes_read": [14155776, ...], "disk_bytes": [...],
     "io_wait_ms": [0.81, ...], "compute_ms": [2.3, ...]}

`experts[j]` / `weights[j]` belong to decoder layer `moe_layers[j]`; weights are the router's mixing
weights after top-k (and renormalisation where the model does it), in the order of `experts`. `token`
(the input token id) and `weights` may be null when the recorder does not know them. A prompt's tokens are
recorded too (`"prefill": true`), since they touch the expert cache as well. The store's side (`hit`,
`bytes_read`, `disk_bytes`, `io_wait_ms`, `compute_ms`) is optional: the engine's `Tracer` writes it, a
recorder that sees only the router leaves it out.

Writers: `Tracer` through `record_trace` (`flashmoe generate --trace FILE`) and the benchmark's route hook
(bench/decode_run.py); reader: `read_trace`; consumers: `flashmoe bench --replay FILE` (flashmoe/runtime/replay.py) and
`flashmoe plot` (flashmoe/plot.py). The server streams the same lines live (`GET /v1/trace`,
flashmoe/serve/live_trace.py), for its web page.
"""

from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterator, Sequence

import numpy as np

from flashmoe.format.atomic import atomic_path
from flashmoe.errors import FormatError

if TYPE_CHECKING:
    from flashmoe.runtime.engine import Engine
    from flashmoe.runtime.stats import Stats
    from flashmoe.runtime.store import ExpertRead, ExpertStore, Fetch

FORMAT = "flashmoe-routing-trace"
VERSION = 1


@dataclass(frozen=True)
class TraceHeader:
    """The first line of a trace. `moe_layers` orders each token's per-layer lists; `io` (the store's mode,
    "pagecache" or "direct") and `expert_bytes` (one expert's bytes in its file) are None when unknown."""

    num_experts: int
    experts_per_token: int
    moe_layers: tuple[int, ...]
    model: str = ""
    io: str | None = None
    expert_bytes: int | None = None

    def to_dict(self) -> dict:
        d = {"format": FORMAT, "version": VERSION, "model": self.model, "num_experts": self.num_experts,
             "experts_per_token": self.experts_per_token, "moe_layers": list(self.moe_layers)}
        d.update({k: v for k, v in (("io", self.io), ("expert_bytes", self.expert_bytes)) if v is not None})
        return d


#: The store's side of a token line, per MoE layer: (field, numpy dtype); each [n_moe_layers] except `hit`
STORE_FIELDS = (("bytes_read", np.int64), ("disk_bytes", np.int64), ("io_wait_ms", np.float64),
                ("compute_ms", np.float64))


@dataclass(frozen=True)
class TraceToken:
    """One token: `experts` int32 [n_moe_layers, k]; `weights` float32 [n_moe_layers, k] or None.

    The store's side, each None when not recorded: `hit` bool [n_moe_layers, k] (each routed expert found
    in memory), `bytes_read` and `disk_bytes` int64 [n_moe_layers] (bytes copied for this token, of which
    from the device), `io_wait_ms` and `compute_ms` float64 [n_moe_layers] (time blocked on reads, compute
    time of the decoder layer ending with that MoE layer). docs/formats.md says how a prompt's shared reads
    and time are attributed to its tokens.
    """

    pos: int
    experts: np.ndarray
    weights: np.ndarray | None = None
    token: int | None = None
    prefill: bool = False
    hit: np.ndarray | None = None
    bytes_read: np.ndarray | None = None
    disk_bytes: np.ndarray | None = None
    io_wait_ms: np.ndarray | None = None
    compute_ms: np.ndarray | None = None


class TraceSink:
    """Formats a trace's token lines for one header (`write`); a subclass puts each line somewhere (`put`):
    a file (TraceWriter) or, in the server, the live stream of /v1/trace (flashmoe.serve.live_trace)."""

    def __init__(self, header: TraceHeader):
        self.header = header
        self._pos = 0

    def write(self, experts: np.ndarray | Sequence[Sequence[int]], weights: np.ndarray | None = None,
              token: int | None = None, prefill: bool = False, *, hit: np.ndarray | None = None,
              bytes_read: np.ndarray | None = None, disk_bytes: np.ndarray | None = None,
              io_wait_ms: np.ndarray | None = None, compute_ms: np.ndarray | None = None) -> None:
        """Record the next token: experts [n_moe_layers, k] (ints), weights and hit the same shape or None;
        bytes_read, disk_bytes (ints), io_wait_ms, compute_ms (floats) [n_moe_layers] or None.
        Raises ValueError when a shape does not match the header."""
        e = np.asarray(experts, dtype=np.int64)
        n = len(self.header.moe_layers)
        if e.ndim != 2 or e.shape[0] != n:
            raise ValueError(f"trace token needs experts [{n}, k], got {e.shape}")
        line = {"pos": self._pos, "token": token, "experts": e.tolist(),
                "weights": None if weights is None else np.round(np.asarray(weights, np.float64), 5).tolist()}
        if prefill:
            line["prefill"] = True
        if hit is not None:
            line["hit"] = _checked("hit", hit, bool, e.shape).tolist()
        given = dict(bytes_read=bytes_read, disk_bytes=disk_bytes, io_wait_ms=io_wait_ms, compute_ms=compute_ms)
        for name, dtype in STORE_FIELDS:
            if given[name] is not None:
                a = _checked(name, given[name], dtype, (n,))
                line[name] = (np.round(a, 4) if dtype is np.float64 else a).tolist()
        self.put(line)
        self._pos += 1

    def put(self, line: dict) -> None:
        """Deliver one token line (a JSON-ready dict)."""
        raise NotImplementedError


class TraceWriter(TraceSink):
    """Append tokens to a JSONL routing trace. Use as a context manager or call close().

    The lines go to a temporary file beside `path` (flashmoe.format.atomic), renamed to `path` by close(); leaving
    the context manager with an exception removes it instead, so a failed run leaves no trace that looks
    complete."""

    def __init__(self, path: str | Path, header: TraceHeader):
        super().__init__(header)
        self.path = Path(path)
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._f: IO[str] = self._stack.enter_context(open(tmp, "w", encoding="utf-8"))
        self._f.write(json.dumps(header.to_dict()) + "\n")

    def put(self, line: dict) -> None:
        self._f.write(json.dumps(line, separators=(",", ":")) + "\n")

    def close(self) -> None:
        """Finish the file: rename it to `path`."""
        self._stack.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)


def _checked(name: str, values, dtype, shape: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(values, dtype=dtype)
    if a.shape != shape:
        raise ValueError(f"trace token field {name} needs shape {list(shape)}, got {list(a.shape)}")
    return a


def read_trace(path: str | Path) -> tuple[TraceHeader, list[TraceToken]]:
    """Read a whole trace. Raises FormatError naming the file and line for a malformed header or token
    (wrong format name/version, layer count, expert id out of range, a field of the wrong shape)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise FormatError(f"{path}: cannot read trace: {e.strerror or e}") from None
    if not lines:
        raise FormatError(f"{path}: empty trace (no header line)")
    try:
        h = json.loads(lines[0])
        if h.get("format") != FORMAT or h.get("version") != VERSION:
            raise FormatError(f"{path}:1: not a {FORMAT} version {VERSION} header")
        header = TraceHeader(int(h["num_experts"]), int(h["experts_per_token"]),
                             tuple(int(i) for i in h["moe_layers"]), str(h.get("model", "")), h.get("io"),
                             None if h.get("expert_bytes") is None else int(h["expert_bytes"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"{path}:1: malformed trace header: {e}") from None
    return header, list(_tokens(path, header, lines))


def _tokens(path: Path, header: TraceHeader, lines: list[str]) -> Iterator[TraceToken]:
    n_layers = len(header.moe_layers)
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            experts = np.asarray(d["experts"], dtype=np.int32)
            weights = None if d.get("weights") is None else np.asarray(d["weights"], dtype=np.float32)
            hit = None if d.get("hit") is None else _checked("hit", d["hit"], bool, experts.shape)
            store = {name: None if d.get(name) is None else _checked(name, d[name], dtype, (n_layers,))
                     for name, dtype in STORE_FIELDS}
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{path}:{n}: malformed trace token: {e}") from None
        if experts.ndim != 2 or experts.shape[0] != n_layers:
            raise FormatError(f"{path}:{n}: experts has shape {experts.shape}, expected [{n_layers}, k]")
        if experts.size and (experts.min() < 0 or experts.max() >= header.num_experts):
            raise FormatError(f"{path}:{n}: expert id outside 0..{header.num_experts - 1}")
        if weights is not None and weights.shape != experts.shape:
            raise FormatError(f"{path}:{n}: weights shape {weights.shape} differs from experts {experts.shape}")
        yield TraceToken(int(d.get("pos", n - 2)), experts, weights, d.get("token"), bool(d.get("prefill", False)),
                         hit, **store)


def lookup_keys(header: TraceHeader, tokens: Sequence[TraceToken]) -> list[tuple[int, int]]:
    """The expert-cache lookups the trace implies, in order: (layer, expert) for each token, each MoE layer,
    each routed expert — what the direct-mode cache sees (flashmoe.runtime.eviction.simulate_hit_rate replays it)."""
    return [(layer, int(e)) for t in tokens for layer, row in zip(header.moe_layers, t.experts) for e in row]


@dataclass
class _LayerRecord:
    ids: np.ndarray  # (T, k)
    weights: np.ndarray  # (T, k)
    reads: dict[int, "ExpertRead"]  # distinct expert -> what its fetch did
    io_wait_s: float
    compute_s: float


class Tracer:
    """Writes what an Engine does to a TraceSink (a TraceWriter's file, the server's live stream), one line per token (`Engine(..., tracer=...)`; or use
    `record_trace`).

    The engine calls `begin(token_ids)` as each forward starts and `layer(...)` as each MoE layer ends;
    after the last MoE layer, the forward's T tokens are written. Router side: the ids and weights the
    engine routed with. Store side, from `ExpertStore.report` of the layer's fetches: hit and bytes per
    expert. Time, from the Stats counters between two calls: I/O wait, and compute of everything since the
    previous MoE layer ended (this layer's attention, router, shared expert, experts; the first MoE layer
    also carries the embedding and any dense layers before it; the lm_head is outside every layer).

    A prompt (T > 1) reads each expert once for all its tokens: that read's bytes and hit/miss go to the
    first token (in position, then top-k, order) that routed to it; later tokens of the prompt using the
    same expert count as hits with no bytes, as do experts no fetch asked for (a backend that keeps experts
    in its own memory, such as a GPU expert cache, computes them without the store). The layer's I/O wait
    and compute are split evenly over the T tokens. So bytes, disk bytes, I/O wait, compute (all stages but
    the lm_head) and the count of misses summed over the trace equal the run's counters, up to the rounding
    of times to 0.1 µs; hits do not, since the run counts one lookup per distinct expert fetched and the
    trace one per routed (token, expert) pair (docs/formats.md, "Routing trace").
    """

    def __init__(self, writer: TraceSink, store: "ExpertStore", stats: "Stats"):
        self.writer, self._store, self._stats = writer, store, stats
        self._token_ids = np.zeros(0, np.int64)
        self._layers: list[_LayerRecord] = []
        self._mark = replace(stats.totals)

    def begin(self, token_ids: np.ndarray) -> None:
        """A forward of `token_ids` int [T] starts (a partial token left by an interrupted one is dropped)."""
        self._token_ids = np.asarray(token_ids, np.int64).reshape(-1)
        self._layers = []
        self._mark = replace(self._stats.totals)

    def layer(self, layer: int, ids: np.ndarray, weights: np.ndarray, fetches: Sequence["Fetch"]) -> None:
        """MoE layer `layer` is done for the forward's T tokens: `ids` int (T, k) and `weights` (T, k) as routed,
        `fetches` every store fetch it waited for (none when the backend held every expert). Raises ValueError
        when layers arrive out of order."""
        expected = self.writer.header.moe_layers[len(self._layers)]
        if layer != expected:
            raise ValueError(f"tracer expected MoE layer {expected}, got layer {layer}")
        now = replace(self._stats.totals)
        spent, self._mark = now - self._mark, now
        reads = {r.expert: r for f in fetches for r in self._store.report(f)}
        self._layers.append(_LayerRecord(np.asarray(ids), np.asarray(weights), reads, spent.io_wait_s,
                                         spent.compute_s))
        if len(self._layers) == len(self.writer.header.moe_layers):
            self._write_tokens()
            self._layers = []

    def _write_tokens(self) -> None:
        T = len(self._token_ids)
        n, k = len(self._layers), self._layers[0].ids.shape[1]
        hit = np.ones((T, n, k), bool)
        known = True
        nbytes = np.zeros((2, T, n), np.int64)  # bytes_read, disk_bytes
        for j, rec in enumerate(self._layers):
            charged: set[int] = set()
            for t in range(T):
                for slot, e in enumerate(rec.ids[t].tolist()):
                    if e in charged:
                        continue  # read once for the prompt, by an earlier token
                    charged.add(e)
                    r = rec.reads.get(e)
                    if r is None:
                        continue  # no fetch asked for it: the backend holds it (a GPU expert cache), a hit
                    known = known and r.hit is not None
                    hit[t, j, slot] = bool(r.hit)
                    nbytes[:, t, j] += (r.bytes_read, r.disk_bytes)
        io_wait = np.array([1e3 * rec.io_wait_s / T for rec in self._layers])
        compute = np.array([1e3 * rec.compute_s / T for rec in self._layers])
        for t in range(T):
            self.writer.write(np.stack([rec.ids[t] for rec in self._layers]),
                              np.stack([rec.weights[t] for rec in self._layers]),
                              token=int(self._token_ids[t]), prefill=T > 1, hit=hit[t] if known else None,
                              bytes_read=nbytes[0, t], disk_bytes=nbytes[1, t], io_wait_ms=io_wait,
                              compute_ms=compute)


@contextmanager
def record_trace(engine: "Engine", path: str | Path, model: str = "") -> Iterator[Tracer]:
    """Trace every forward of `engine` inside the block to `path` (atomically: the file appears when the
    block ends normally, and not at all when it raises). `model` names the model in the header."""
    with TraceWriter(path, trace_header(engine, model)) as writer:
        engine.tracer = Tracer(writer, engine.store, engine.stats)
        try:
            yield engine.tracer
        finally:
            engine.tracer = None


def trace_header(engine: "Engine", model: str = "") -> TraceHeader:
    """The header of a trace of `engine`'s forwards; `model` names the model."""
    return TraceHeader(engine.cfg.num_experts, engine.k, tuple(engine.model_dir.moe_layers), model,
                       io=engine.store.mode, expert_bytes=engine.store.nbytes)
