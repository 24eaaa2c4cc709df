"""Routing traces: which experts each token routed to in each MoE layer, as JSON Lines (docs/formats.md,
"Routing trace").

Line 1 is a header object, every further line one token:

    {"format": "flashmoe-routing-trace", "version": 1, "model": "...", "num_experts": 512,
     "experts_per_token": 4, "moe_layers": [0, 1, 2, 3]}
    {"pos": 0, "token": 9707, "experts": [[17, 3, 250, 8], ...], "weights": [[0.41, 0.22, 0.2, 0.17], ...]}

`experts[j]` / `weights[j]` belong to decoder layer `moe_layers[j]`; weights are the router's mixing
weights after top-k (and renormalisation where the model does it), in the order of `experts`. `token`
(the input token id) and `weights` may be null when the recorder does not know them. A prompt's tokens are
recorded too (`"prefill": true`), since they touch the expert cache as well.

Writers: `flashmoe generate --trace FILE` (issue 5) and `bench.trace_record` (from the store's fetches);
reader: `read_trace`; consumer: `flashmoe bench --replay FILE` (bench/replay.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np

from flashmoe.errors import FormatError

FORMAT = "flashmoe-routing-trace"
VERSION = 1


@dataclass(frozen=True)
class TraceHeader:
    """The first line of a trace. `moe_layers` orders each token's per-layer lists."""

    num_experts: int
    experts_per_token: int
    moe_layers: tuple[int, ...]
    model: str = ""

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": self.model, "num_experts": self.num_experts,
                "experts_per_token": self.experts_per_token, "moe_layers": list(self.moe_layers)}


@dataclass(frozen=True)
class TraceToken:
    """One token: `experts` int32 [n_moe_layers, k]; `weights` float32 [n_moe_layers, k] or None."""

    pos: int
    experts: np.ndarray
    weights: np.ndarray | None = None
    token: int | None = None
    prefill: bool = False


class TraceWriter:
    """Append tokens to a JSONL routing trace. Use as a context manager or call close()."""

    def __init__(self, path: str | Path, header: TraceHeader):
        self.path = Path(path)
        self.header = header
        self._f: IO[str] = open(self.path, "w", encoding="utf-8")
        self._f.write(json.dumps(header.to_dict()) + "\n")
        self._pos = 0

    def write(self, experts: np.ndarray | Sequence[Sequence[int]], weights: np.ndarray | None = None,
              token: int | None = None, prefill: bool = False) -> None:
        """Record the next token: experts [n_moe_layers, k] (ints), weights the same shape or None.
        Raises ValueError when the shape does not match the header."""
        e = np.asarray(experts, dtype=np.int64)
        if e.ndim != 2 or e.shape[0] != len(self.header.moe_layers):
            raise ValueError(f"trace token needs experts [{len(self.header.moe_layers)}, k], got {e.shape}")
        line = {"pos": self._pos, "token": token, "experts": e.tolist(),
                "weights": None if weights is None else np.round(np.asarray(weights, np.float64), 5).tolist()}
        if prefill:
            line["prefill"] = True
        self._f.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._pos += 1

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_trace(path: str | Path) -> tuple[TraceHeader, list[TraceToken]]:
    """Read a whole trace. Raises FormatError naming the file and line for a malformed header or token
    (wrong format name/version, layer count or expert id out of range)."""
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
                             tuple(int(i) for i in h["moe_layers"]), str(h.get("model", "")))
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
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{path}:{n}: malformed trace token: {e}") from None
        if experts.ndim != 2 or experts.shape[0] != n_layers:
            raise FormatError(f"{path}:{n}: experts has shape {experts.shape}, expected [{n_layers}, k]")
        if experts.size and (experts.min() < 0 or experts.max() >= header.num_experts):
            raise FormatError(f"{path}:{n}: expert id outside 0..{header.num_experts - 1}")
        if weights is not None and weights.shape != experts.shape:
            raise FormatError(f"{path}:{n}: weights shape {weights.shape} differs from experts {experts.shape}")
        yield TraceToken(int(d.get("pos", n - 2)), experts, weights, d.get("token"), bool(d.get("prefill", False)))


def lookup_keys(header: TraceHeader, tokens: Sequence[TraceToken]) -> list[tuple[int, int]]:
    """The expert-cache lookups the trace implies, in order: (layer, expert) for each token, each MoE layer,
    each routed expert — what the direct-mode cache sees (flashmoe.eviction.simulate_hit_rate replays it)."""
    return [(layer, int(e)) for t in tokens for layer, row in zip(header.moe_layers, t.experts) for e in row]
