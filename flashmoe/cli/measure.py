"""The commands that measure and check this machine and flashmoe: bench, conformance, backends, plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from flashmoe.cli.shared import user_errors
from flashmoe.errors import FlashMoeError
from flashmoe.runtime.eviction import DEFAULT_POLICY, POLICIES


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _csv_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _csv(text))
    except ValueError:
        raise FlashMoeError(f"{option}: {text!r} is not a comma-separated list of whole numbers") from None


def _on_off(text: str, option: str) -> bool:
    if text not in ("on", "off"):
        raise FlashMoeError(f"{option}: {text!r} is neither 'on' nor 'off'")
    return text == "on"


@user_errors
def bench(
    model_dir: Optional[Path] = typer.Argument(None, help="flashmoe model directory (e.g. from `flashmoe synth`; "
                                                "default: the bundled demo model, unless only --replay is given)."),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Directory for bench.json, bench.md, figures."),
    backend: str = typer.Option("numba", help="Compute backend."),
    activations: Optional[str] = typer.Option(None, help="'q8' or 'float' (default: the backend's)."),
    modes: str = typer.Option("pagecache,direct", help="Comma-separated expert store modes."),
    k: str = typer.Option("", "-k", "--experts-per-token", help="Comma-separated k values (default: the model's)."),
    threads: str = typer.Option("", help="Comma-separated compute thread counts (default: all cores)."),
    budgets: str = typer.Option("", help="Comma-separated --max-memory budgets to decode under, e.g. 2G,4G."),
    io_threads: Optional[int] = typer.Option(None, help="Expert read threads (default: the store's)."),
    prompt_tokens: int = typer.Option(8, help="Random prompt length (prefill) before decoding."),
    tokens: int = typer.Option(16, help="Decode tokens per pass."),
    passes: str = typer.Option("cold,warm", help="Passes of each budgeted run: cold (page cache dropped first) "
                               "and/or warm (the same tokens again)."),
    reference_tokens: Optional[int] = typer.Option(None, help="Decode tokens of the uncapped reference run whose "
                                                   "warm pass gives the compute time (default: --tokens)."),
    disk_repeats: int = typer.Option(3, help="Cold passes per disk measurement (median reported)."),
    cgroup: bool = typer.Option(False, "--cgroup", help="Run each budgeted decode in a memory cgroup of that size "
                                "(cgroup v1, root; caps the page cache too)."),
    cache_policy: str = typer.Option(DEFAULT_POLICY, help=f"Eviction policy of the direct-mode cache ({', '.join(POLICIES)})."),
    routing: str = typer.Option("model", help="'model' (the router's picks) or 'uniform' (seeded uniform random "
                                "picks: the worst case for a cache, a benchmark workload)."),
    speculate: str = typer.Option("off", help="Budgeted runs without ('off') and/or with ('on') speculative reads "
                                  "of the next layer's experts, e.g. off,on."),
    replay_trace: Optional[list[Path]] = typer.Option(None, "--replay", help="Routing trace to replay through "
                                                      "every eviction policy (repeatable)."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Draw the matplotlib figures."),
    peer: Optional[str] = typer.Option(None, help="'llama.cpp': run it beside flashmoe on the same weights (GGUF "
                                       "export), tokens, k, threads and cap; built and cached on first use."),
    peer_gguf: Optional[Path] = typer.Option(None, help="The peer's GGUF file (default: MODEL_DIR.q4_0.gguf beside "
                                             "the model, exported when absent)."),
) -> None:
    """Decode speed against the disk-bound ceiling (cold/warm, pagecache/direct, budgets), and cache replays."""
    from flashmoe.bench.streaming import BenchOptions, run_bench
    from flashmoe.runtime.load import default_model_dir

    if model_dir is None and not replay_trace:  # as generate, chat and serve do
        model_dir = default_model_dir()
        typer.echo(f"bench: no model directory given: the bundled demo model ({model_dir})", err=True)
    opts = BenchOptions(
        model_dir=model_dir, out=out, backend=backend, activations=activations, modes=tuple(_csv(modes)),
        ks=_csv_ints(k, "-k/--experts-per-token") or (None,),
        threads=_csv_ints(threads, "--threads") or (os.cpu_count() or 1,),
        budgets=tuple(_csv(budgets)), io_threads=io_threads, prompt_tokens=prompt_tokens, tokens=tokens,
        passes=tuple(_csv(passes)), reference_tokens=reference_tokens, disk_repeats=disk_repeats, cgroup=cgroup,
        cache_policy=cache_policy, routing=routing, speculate=tuple(_on_off(x, "--speculate") for x in _csv(speculate)),
        replays=tuple(replay_trace or ()), peer=peer, peer_gguf=peer_gguf,
        figures=figures, log=lambda line: typer.echo(line, err=True))
    run_bench(opts)
    typer.echo((out / "bench.md").read_text())


@user_errors
def conformance(
    backend: Optional[str] = typer.Option(None, help="Backend to check (default: every available backend)."),
    full: bool = typer.Option(False, "--full", help="Run the full suite instead of the quick one."),
) -> None:
    """Check backends against the NumPy reference on every format and print a table; records a stamp on success."""
    from flashmoe.conformance.runner import main as conformance_main
    from flashmoe.runtime.load import load_engine

    raise typer.Exit(conformance_main(backend=backend, full=full, make_engine=load_engine))


def _nvidia_gpus() -> str | None:
    """Name and memory of each NVIDIA GPU that nvidia-smi reports ("NVIDIA H200, 143771 MiB"; several
    joined by "; "), or None when there is none or no nvidia-smi."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return "; ".join(line.strip() for line in out.splitlines() if line.strip()) or None


@user_errors
def backends() -> None:
    """List every backend: available here or why not, the device it computes on, its conformance stamp."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from flashmoe.backends import available_backends, get_backend
    from flashmoe.conformance.runner import REFERENCE_BACKEND, read_stamp

    reasons = available_backends()
    gpus = _nvidia_gpus()
    if "cuda" not in reasons:
        reasons["cuda"] = "not in this flashmoe version"
    # Cells stay short; the long reasons go below the table as notes, wrapped between words (a table column
    # of 80-column terminals would break them inside words: "numba.cuda.is_avail / able()").
    table = Table(title="flashmoe backends")
    for col in ("backend", "available", "device", "conformance"):
        table.add_column(col, overflow="fold")
    notes: list[str] = []

    def note(text: str) -> str:
        notes.append(text)
        return f"({len(notes)})"

    for name, why in sorted(reasons.items()):
        if name == "cuda":
            device = gpus or "no NVIDIA GPU found"
        elif why is None:
            device = get_backend(name).device_description()
        else:
            device = "cpu"
        available = "yes" if why is None else "no " + note(f"{name}: {why}")
        if name == REFERENCE_BACKEND:
            stamp = "the reference (not gated)"
        elif why is not None:
            stamp = "-"
        elif record := read_stamp(name):
            stamp = f"passed {record['when'][:10]} ({record['cases']} cases) " + \
                note(f"{name}: checked for {'; '.join(record['formats'])}")
        else:
            stamp = "not checked yet " + note(f"{name}: checked on first use, or now with "
                                              f"`flashmoe conformance --backend {name}`")
        table.add_row(*map(escape, (name, available, device, stamp)))
    console = Console()
    console.print(table)
    for i, text in enumerate(notes, 1):
        console.print(escape(f"({i}) {text}"))  # escaped: "pip install 'mlx[cpu]'" is not Rich markup


@user_errors
def plot(
    trace: Path = typer.Argument(..., help="Routing trace (JSONL) from `flashmoe generate --trace`."),
    out: Path = typer.Option(..., "--out", help="Directory for the PNG figures (created if missing)."),
    tokens: int = typer.Option(48, help="Tokens shown in the expert-choice map (the first ones)."),
    model_dir: Optional[Path] = typer.Option(None, "--model", help="Model directory whose tokenizer labels the "
                                             "map's tokens (default: positions)."),
) -> None:
    """Draw what the router and the expert store did: expert choices, popularity, reuse, ms/layer, hit rate vs cache."""
    from flashmoe.plot import plot_trace

    for name, result in plot_trace(trace, out, max_tokens=tokens, model_dir=model_dir).items():
        typer.echo(f"{name}: {result if isinstance(result, Path) else 'skipped: ' + result}")
