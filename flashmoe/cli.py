"""The `flashmoe` command line. Each command is a thin shell over a module that does the work;
every FlashMoeError becomes one `error: ...` line on stderr and exit code 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from flashmoe.errors import FlashMoeError

app = typer.Typer(
    help="Run Mixture-of-Experts models larger than memory by streaming routed experts from SSD.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _user_errors(fn):
    """Turn FlashMoeError into a one-line message and exit code 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FlashMoeError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)

    return wrapper


@app.command()
@_user_errors
def convert(
    src: str = typer.Argument(..., help="Hugging Face or MLX checkpoint: a local directory or a Hub id."),
    dst: Path = typer.Argument(..., help="Output flashmoe model directory (must not exist unless --force)."),
    bits: str = typer.Option("4", help="Bits for resident linear weights: 2, 3, 4, 6, 8, or 'none' for float."),
    group_size: int = typer.Option(64, help="Quantisation group size (32, 64 or 128)."),
    expert_bits: Optional[str] = typer.Option(None, help="Bits for routed experts (default: --bits)."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it exists."),
) -> None:
    """Convert a checkpoint into a flashmoe model directory (resident.safetensors + experts/*.bin)."""
    from flashmoe.convert import convert_checkpoint

    convert_checkpoint(src, dst, bits=bits, group_size=group_size, expert_bits=expert_bits, force=force)


@app.command()
@_user_errors
def info(
    model_dir: Path = typer.Argument(..., help="flashmoe model directory."),
    disk_gbps: float = typer.Option(2.0, help="Disk read bandwidth in GB/s used for the decode ceiling."),
) -> None:
    """Architecture, total/active parameters, resident bytes, expert bytes per token, decode ceiling."""
    from flashmoe.info import describe

    typer.echo(describe(model_dir, disk_gbps=disk_gbps))


@app.command()
@_user_errors
def logits(
    model_dir: Path = typer.Argument(..., help="flashmoe model directory."),
    tokens: str = typer.Option(..., help="Comma-separated token ids, e.g. 1,2,3."),
    out: Path = typer.Option(..., help="Output .npy file: float32 [n_tokens, vocab_size]."),
    backend: str = typer.Option("reference", help="reference, or a backend name (numpy, numba, mlx)."),
) -> None:
    """Write the model's logits for a token sequence (to verify a backend or a conversion)."""
    from flashmoe.info import write_logits

    write_logits(model_dir, tokens, out, backend=backend)


@app.command()
@_user_errors
def conformance(
    backend: Optional[str] = typer.Option(None, help="Backend to check (default: every available backend)."),
    full: bool = typer.Option(False, "--full", help="Run the full suite instead of the quick one."),
) -> None:
    """Check backends against the NumPy reference and print a table; records a stamp on success."""
    from flashmoe.conformance.runner import main as conformance_main

    raise typer.Exit(conformance_main(backend=backend, full=full))
