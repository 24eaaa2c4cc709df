"""Pictures of what the router and the expert store did, drawn from a routing trace (docs/formats.md,
"Routing trace"; `flashmoe generate --trace`). `flashmoe plot TRACE --out DIR` calls `plot_trace`.

Figures (PNG, matplotlib's Agg backend, so no display is needed):
- `expert_choice.png`: MoE layers × tokens; each cell lists the k experts the router picked for that token
  in that layer, each coloured by whether the store found it in memory (hit) or read it from disk (miss).
- `popularity.png`: for each MoE layer, the share of tokens that routed to each expert.
- `reuse.png`: per MoE layer, the share of a token's experts that the previous token (and any of the
  previous 8) also used, against what uniform random routing would give.
- `ms_per_layer.png`: per MoE layer, mean compute and I/O wait per decode token.
- `hit_rate_vs_cache.png`: the trace replayed through every eviction policy at a range of cache sizes
  (flashmoe.runtime.replay: flashmoe.runtime.eviction.simulate_hit_rate, and Belady's optimum as the bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashmoe.errors import FlashMoeError, FormatError
from flashmoe.runtime.trace import TraceHeader, read_trace

#: Figure names, in the order `plot_trace` draws them.
FIGURES = ("expert_choice", "popularity", "reuse", "ms_per_layer", "hit_rate_vs_cache")
REUSE_WINDOW = 8  # tokens looked back for the "any of the last tokens" reuse
_HIT, _MISS, _UNKNOWN = "#9bd69b", "#f08a80", "#d9d9d9"
_DPI = 100


@dataclass
class TraceArrays:
    """A trace as arrays over its N tokens, L MoE layers and k experts per token.

    experts int32 (N, L, k); prefill bool (N,); tokens: input token ids (None entries where unknown);
    weights float32 (N, L, k) or None; hit bool (N, L, k), io_wait_ms and compute_ms float64 (N, L),
    bytes_read int64 (N, L): None when the trace has no store side (a router-only recording) or, for hit,
    when the store could not tell.
    """

    header: TraceHeader
    experts: np.ndarray
    prefill: np.ndarray
    tokens: list
    weights: np.ndarray | None
    hit: np.ndarray | None
    io_wait_ms: np.ndarray | None
    compute_ms: np.ndarray | None
    bytes_read: np.ndarray | None


def load_arrays(path: str | Path) -> TraceArrays:
    """Read a trace into TraceArrays. Raises FormatError (flashmoe.runtime.trace.read_trace) for a malformed file,
    and for a trace without tokens."""
    header, tokens = read_trace(path)
    if not tokens:
        raise FormatError(f"{path}: the trace has a header but no tokens")

    def stacked(name: str):
        values = [getattr(t, name) for t in tokens]
        return None if any(v is None for v in values) else np.stack(values)

    return TraceArrays(header, np.stack([t.experts for t in tokens]), np.array([t.prefill for t in tokens]),
                       [t.token for t in tokens], stacked("weights"), stacked("hit"), stacked("io_wait_ms"),
                       stacked("compute_ms"), stacked("bytes_read"))


def plot_trace(trace: str | Path, out: str | Path, max_tokens: int = 48,
               model_dir: str | Path | None = None) -> dict[str, Path | str]:
    """Draw every figure the trace has data for into `out` (created if missing).

    max_tokens: tokens shown in the expert-choice map (the first ones; the map needs a column per token).
    model_dir: a model directory whose tokenizer turns the map's token ids into text (else positions).
    Returns {figure name: path written, or the reason it was skipped}. Raises FormatError for a malformed
    trace or tokenizer, FlashMoeError when matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        raise FlashMoeError("flashmoe plot needs matplotlib: pip install 'flashmoe[bench]' (or matplotlib)") from None

    matplotlib.use("Agg")
    t = load_arrays(trace)
    token_text = None if model_dir is None else token_labels(t.tokens, model_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # only now: a bad trace or tokenizer leaves no empty directory
    done: dict[str, Path | str] = {
        "expert_choice": _save(expert_choice(t, max_tokens, token_text), out / "expert_choice.png"),
        "popularity": _save(popularity(t), out / "popularity.png"),
        "reuse": _save(reuse(t), out / "reuse.png"),
    }
    if t.compute_ms is None or t.io_wait_ms is None:
        done["ms_per_layer"] = "the trace has no timings (recorded without the engine's tracer)"
    else:
        done["ms_per_layer"] = _save(ms_per_layer(t), out / "ms_per_layer.png")
    done["hit_rate_vs_cache"] = hit_rate_vs_cache(trace, out)
    return done


def token_labels(token_ids: list, model_dir: str | Path) -> list[str]:
    """Each token id decoded alone by the model's tokenizer, with whitespace made visible (space ␣,
    newline ⏎) and other control characters escaped; "?" for an unknown id."""
    from flashmoe.serve.tokenizer import Tokenizer

    tokenizer = Tokenizer(model_dir)

    def visible(text: str) -> str:
        text = text.replace(" ", "\u2423").replace("\n", "\u23ce")
        return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)

    return ["?" if i is None else visible(tokenizer.decode([i], skip_special_tokens=False)) for i in token_ids]


def _layer_labels(t: TraceArrays) -> list[str]:
    return [f"layer {i}" for i in t.header.moe_layers]


def expert_choice(t: TraceArrays, max_tokens: int = 48, token_text: list[str] | None = None):
    """The expert-choice map (a matplotlib Figure): rows are MoE layers (k sub-rows, one per routed expert in
    top-k order), columns the first `max_tokens` tokens; each sub-cell shows the expert id, green for a
    hit, red for a miss, grey where the trace does not say."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    n = min(len(t.experts), max_tokens)
    _, L, k = t.experts.shape
    colors = np.empty((L * k, n, 3))
    status = np.full((n, L, k), 2) if t.hit is None else t.hit[:n].astype(int)  # 1 hit, 0 miss, 2 unknown
    for value, color in ((1, _HIT), (0, _MISS), (2, _UNKNOWN)):
        colors[(status == value).transpose(1, 2, 0).reshape(L * k, n)] = to_rgb(color)
    fig, ax = plt.subplots(figsize=(min(2.5 + 0.32 * n, 18), min(1.2 + 0.22 * L * k, 24)))
    ax.imshow(colors, aspect="auto", interpolation="nearest")
    if n <= 64 and L * k <= 96:  # room for the ids in the cells
        for j in range(L):
            for s in range(k):
                for i in range(n):
                    ax.text(i, j * k + s, str(t.experts[i, j, s]), ha="center", va="center", fontsize=6)
    for j in range(1, L):
        ax.axhline(j * k - 0.5, color="white", lw=2.5)
    ax.set_yticks([j * k + (k - 1) / 2 for j in range(L)], _layer_labels(t), fontsize=7)
    labels = token_text[:n] if token_text is not None else [str(i) for i in range(n)]
    ax.set_xticks(range(n), labels, fontsize=6, rotation=90 if token_text is not None else 0)
    ax.set_xlabel("token (input to this step)" if token_text is not None else "token position")
    n_prompt = int(t.prefill[:n].sum())
    if 0 < n_prompt < n:
        ax.axvline(n_prompt - 0.5, color="black", lw=1.5, ls="--")
    shown = f"first {n} of {len(t.experts)} tokens" if n < len(t.experts) else f"{n} tokens"
    ax.set_title(f"Experts chosen per token and layer ({shown}; k={k} of {t.header.num_experts}; "
                 f"{n_prompt} prompt tokens left of the dashed line)", fontsize=8)
    ax.legend(handles=[Patch(color=_HIT, label="hit (in memory)"), Patch(color=_MISS, label="miss (read from disk)")]
              + ([Patch(color=_UNKNOWN, label="not recorded")] if t.hit is None else []),
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    fig.tight_layout()
    return fig


def expert_shares(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Share of tokens routed to each expert, per MoE layer: experts int (N, L, k) -> float64 (L, E);
    each row sums to k."""
    N, L, _ = experts.shape
    return np.stack([np.bincount(experts[:, j].ravel(), minlength=num_experts) / N for j in range(L)])


def popularity(t: TraceArrays):
    """Per MoE layer, the share of tokens that routed to each expert (a heat map, layers × experts)."""
    import matplotlib.pyplot as plt

    N, L, _ = t.experts.shape
    E = t.header.num_experts
    share = expert_shares(t.experts, E)
    fig, ax = plt.subplots(figsize=(min(3 + 0.22 * E, 16), 1.4 + 0.35 * L))
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
    ax.set_yticks(range(L), _layer_labels(t), fontsize=7)
    ax.set_xlabel("expert id")
    ticks = range(0, E, max(1, E // 32))
    ax.set_xticks(list(ticks), [str(e) for e in ticks], fontsize=6)
    bar = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    bar.set_label("share of tokens", fontsize=7)
    k = t.header.experts_per_token
    ax.set_title(f"Expert popularity per layer over {N} tokens (uniform routing would give {k / E:.2f} "
                 "everywhere)", fontsize=8)
    fig.tight_layout()
    return fig


def reuse_shares(experts: np.ndarray, window: int) -> np.ndarray:
    """Per MoE layer, the mean share of a token's k experts that also appear among the experts of the
    previous `window` tokens. experts int (N, L, k), N >= 2 -> float64 (L,); tokens 1..N-1 are averaged
    (token i looks back at max(0, i-window)..i-1)."""
    N, L, k = experts.shape
    shares = np.zeros(L)
    for j in range(L):
        seen = [set(row.tolist()) for row in experts[:, j]]
        shares[j] = np.mean([len(seen[i] & set().union(*seen[max(0, i - window) : i])) / k for i in range(1, N)])
    return shares


def uniform_reuse(num_experts: int, k: int, window: int) -> float:
    """Expected `reuse_shares` under uniform random routing: the chance that a given expert is among the
    distinct experts of `window` independent earlier tokens, 1 - (1 - k/E)^window."""
    return 1 - (1 - k / num_experts) ** window


def reuse(t: TraceArrays):
    """Per MoE layer, the share of a token's experts already used by the previous token and by any of the
    previous REUSE_WINDOW tokens, with the uniform-routing expectation of each as a dashed line."""
    import matplotlib.pyplot as plt

    N, L, k = t.experts.shape
    E = t.header.num_experts
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * L + 4.5), 3.6))
    x = np.arange(L)
    if N < 2:
        ax.text(0.5, 0.5, "one token: nothing to compare", ha="center", transform=ax.transAxes)
    else:
        for offset, window, color in ((-0.2, 1, "tab:blue"), (0.2, REUSE_WINDOW, "tab:orange")):
            ax.bar(x + offset, 100 * reuse_shares(t.experts, window), 0.4, color=color,
                   label=f"used by the previous {'token' if window == 1 else f'{window} tokens'}")
            ax.axhline(100 * uniform_reuse(E, k, window), color=color, ls="--", lw=1,
                       label=f"uniform routing, {window} token{'s' if window > 1 else ''}")
    ax.set_xticks(x, _layer_labels(t), fontsize=7, rotation=45)
    ax.set_ylabel("% of a token's experts")
    ax.set_ylim(0, 100)
    ax.set_title(f"Token-to-token expert reuse ({N} tokens, k={k} of {E})", fontsize=8)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def ms_per_layer(t: TraceArrays):
    """Per MoE layer, mean compute and I/O wait in ms per decode token (stacked bars); the prompt's tokens
    are used only when the trace has no decode token."""
    import matplotlib.pyplot as plt

    rows = ~t.prefill if (~t.prefill).any() else np.ones_like(t.prefill)
    compute = t.compute_ms[rows].mean(axis=0)
    io_wait = t.io_wait_ms[rows].mean(axis=0)
    L = len(compute)
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * L + 2.5), 3.6))
    x = np.arange(L)
    ax.bar(x, compute, color="tab:purple", label="compute")
    ax.bar(x, io_wait, bottom=compute, color="tab:red", label="I/O wait")
    ax.set_xticks(x, _layer_labels(t), fontsize=7, rotation=45)
    ax.set_ylabel("ms per token")
    which = f"{int(rows.sum())} decode tokens" if (~t.prefill).any() else f"{len(rows)} prompt tokens"
    ax.set_title(f"Time per MoE layer, mean over {which}\nall layers: {compute.sum():.2f} ms compute + "
                 f"{io_wait.sum():.2f} ms I/O wait per token", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def hit_rate_vs_cache(trace: str | Path, out: Path) -> Path:
    """Replay the trace through each eviction policy (and Belady's optimum) at cache sizes from 1% to 75%
    of all experts (flashmoe.runtime.replay) and draw `hit_rate_figure` into out/hit_rate_vs_cache.png: the
    same replay and figure as `flashmoe bench --replay`."""
    from flashmoe.runtime.replay import replay

    r = replay(trace)
    kind = "routing trace" if not r["model"] else f"routing trace of {Path(r['model']).name}"
    return _save(hit_rate_figure([dict(r, kind=kind)]), out / "hit_rate_vs_cache.png")


def hit_rate_figure(replays: list[dict]):
    """Hit rate (%) against cache size (% of all experts), one line per eviction policy and one panel per
    replay (the dicts of flashmoe.runtime.replay.replay, each with a "kind" naming its trace), beside the
    line uniform routing would give (hit rate = cache size); a matplotlib Figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(replays), figsize=(5.5 * len(replays), 4.2), squeeze=False)
    for ax, r in zip(axes[0], replays):
        xs = [100 * s["fraction"] for s in r["sizes"]]
        for policy in r["sizes"][0]["hit_rate"]:
            ax.plot(xs, [100 * s["hit_rate"][policy] for s in r["sizes"]], "-o", ms=3, label=policy)
        ax.plot(xs, xs, ":", color="gray", label="uniform routing (size = hit rate)")
        ax.set_xlabel("cache size (% of all experts)")
        ax.set_ylabel("hit rate (%)")
        ax.set_title(f"{r['kind']}: {Path(r['trace']).name}\n{r['tokens']} tokens, k={r['experts_per_token']}",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    """Write `fig` as a PNG of at most 128 colours: the figures are flat colours and text, so the palette
    loses nothing visible and makes files several times smaller (for docs/figures)."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=_DPI, format="png")
    plt.close(fig)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=128).save(path, optimize=True)
    return path
