"""The commands that make, describe and check a model directory: convert, synth, info, verify, logits."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flashmoe.arch.presets import PRESETS
from flashmoe.cli.shared import user_errors


@user_errors
def convert(
    src: str = typer.Argument(..., help="Hugging Face or MLX checkpoint (a local directory or a Hub id), or a "
                              "llama.cpp GGUF file (the first of its splits); a GGUF keeps its own quantisation."),
    dst: Path = typer.Argument(..., help="Output flashmoe model directory (must not exist unless --force)."),
    bits: str = typer.Option("4", help="Bits for resident linear weights: 2, 3, 4, 5, 6, 8, or 'none' for float."),
    group_size: int = typer.Option(64, help="Quantisation group size (32, 64 or 128)."),
    expert_bits: Optional[str] = typer.Option(None, help="Bits for routed experts (default: --bits; MXFP4 "
                                              "experts, as gpt-oss publishes them, are kept unless given)."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it is a flashmoe model directory or "
                               "empty (never the source, the current directory or other files)."),
) -> None:
    """Convert a checkpoint into a flashmoe model directory (resident.safetensors + experts/*.bin)."""
    if src.endswith(".gguf"):
        from flashmoe.convert.gguf_model import convert_gguf

        if (bits, group_size, expert_bits) != ("4", 64, None):
            typer.echo("note: a GGUF keeps its own quantisation; --bits/--group-size/--expert-bits do not apply",
                       err=True)
        convert_gguf(src, dst, force=force)
        return
    from flashmoe.convert.checkpoint import convert_checkpoint

    convert_checkpoint(src, dst, bits=bits, group_size=group_size, expert_bits=expert_bits, force=force)


@user_errors
def synth(
    out: Path = typer.Option(..., "--out", help="Output model directory (must not exist unless --force)."),
    like: Optional[str] = typer.Option(None, "--like", help=f"A real model's shapes: {', '.join(PRESETS)}."),
    config: Optional[Path] = typer.Option(None, "--config", help="A Hugging Face config.json instead of --like."),
    layers: Optional[int] = typer.Option(None, help="Keep only the first N decoder layers (figures from such a "
                                         "model are per layer)."),
    bits: str = typer.Option("4", help="Bits of quantised weights: 2, 3, 4, 5, 6, 8, or 'none' for bf16 floats."),
    group_size: int = typer.Option(64, help="Quantisation group size (32, 64 or 128)."),
    seed: int = typer.Option(0, help="Random seed of the weights."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is a flashmoe model directory or "
                               "empty (never the current directory or other files)."),
) -> None:
    """Write a synthetic model: a real model's exact shapes, random quantised weights, real tokenizer."""
    from flashmoe.convert.checkpoint import parse_bits
    from flashmoe.convert.synth import synth_like

    path = synth_like(out, like=like, config_path=config, layers=layers, bits=parse_bits(bits),
                      group_size=group_size, seed=seed, force=force)
    typer.echo(f"wrote {path}")


@user_errors
def info(
    model_dir: Optional[Path] = typer.Argument(None, help="flashmoe model directory (default: the bundled demo "
                                                "model), or a Hugging Face / MLX checkpoint directory or a GGUF "
                                                "file to describe before converting it."),
    disk_gbps: float = typer.Option(2.0, help="Disk read bandwidth in GB/s used for the decode ceiling."),
    like: Optional[str] = typer.Option(None, "--like", help="A preset's full-depth figures at 4 bits, from its "
                                       "config alone (e.g. deepseek-v3, glm-4.5; see `flashmoe synth --like`)."),
) -> None:
    """Architecture, total/active parameters, resident bytes, expert bytes per token, decode ceiling."""
    from flashmoe.format.manifest import MANIFEST, RESIDENT
    from flashmoe.info import describe, describe_checkpoint, describe_gguf, describe_preset
    from flashmoe.runtime.load import default_model_dir

    if like is not None:
        typer.echo(describe_preset(like, disk_gbps=disk_gbps))
        return
    if model_dir is not None and model_dir.suffix == ".gguf":
        typer.echo(describe_gguf(model_dir, disk_gbps=disk_gbps))
        return
    if model_dir is not None and (model_dir / "config.json").is_file() and not any(
            (model_dir / name).exists() for name in (MANIFEST, RESIDENT)):  # a checkpoint, not a damaged model
        typer.echo(describe_checkpoint(model_dir, disk_gbps=disk_gbps))
        return
    typer.echo(describe(model_dir or default_model_dir(), disk_gbps=disk_gbps))


@user_errors
def verify(
    model_dir: Optional[Path] = typer.Argument(None, help="flashmoe model directory (default: the bundled demo "
                                                "model)."),
) -> None:
    """Recompute every file's SHA-256 and compare it with flashmoe.json (reads the whole model; loading a
    model checks only file sizes). Exits 2 naming the first weight file that differs; settings files that
    changed (config.json, generation_config.json, tokenizer files: users may edit them) are named, not refused."""
    from tqdm import tqdm

    from flashmoe.runtime.load import default_model_dir
    from flashmoe.runtime.memory import format_size
    from flashmoe.format.modeldir import ModelDir

    with ModelDir.open(model_dir or default_model_dir()) as model:
        files = model.manifest.files
        total = sum(entry.size for entry in files.values())
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"verifying {model.path.name}",
                  disable=None) as bar:  # None: a bar only on a terminal
            changed = model.verify_checksums(progress=bar.update)
    matched = {rel: entry.size for rel, entry in files.items() if rel not in changed}
    typer.echo(f"ok: {len(matched)} files ({format_size(sum(matched.values()))}) match the SHA-256 sums in "
               "flashmoe.json")
    if changed:
        typer.echo(f"changed since the model was written (settings, not weights; flashmoe reads them as they are "
                   f"now): {', '.join(changed)}")


@user_errors
def logits(
    model_dir: Path = typer.Argument(..., help="flashmoe model directory."),
    tokens: str = typer.Option(..., help="Comma-separated token ids, e.g. 1,2,3."),
    out: Path = typer.Option(..., help="Output .npy file: float32 [n_tokens, vocab_size]."),
    backend: str = typer.Option("reference", help="reference, or a backend name (numpy, numba, mlx)."),
) -> None:
    """Write the model's logits for a token sequence (to verify a backend or a conversion)."""
    from flashmoe.info import write_logits

    write_logits(model_dir, tokens, out, backend=backend)
