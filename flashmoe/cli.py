"""The `flashmoe` command line. Each command is a thin shell over a module that does the work;
every FlashMoeError becomes one `error: ...` line on stderr and exit code 2."""

from __future__ import annotations

import functools
import io
import inspect
import os
import signal
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import typer

from flashmoe.arch.presets import PRESETS
from flashmoe.errors import FlashMoeError
from flashmoe.runtime.eviction import DEFAULT_POLICY, POLICIES

app = typer.Typer(
    help="Run Mixture-of-Experts models larger than memory by streaming routed experts from SSD.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help wraps every column to the terminal; typer's Rich tables cut long option names and
    # words with "…" at 80 columns.
    rich_markup_mode=None,
)


def _print_version(given: bool) -> None:
    if given:
        from flashmoe import __version__

        typer.echo(f"flashmoe {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print flashmoe's version and exit.")) -> None:
    """Options before the command. typer has no version option of its own; this is its documented recipe."""


class _Command(typer.core.TyperCommand):
    """A command whose help shows flags as flags: typer's rich help prints a flag's type after it
    (`--stats <bool>`), which reads as if the flag took a value."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


def _command(**kwargs):
    """`app.command` for a `_Command`."""
    return app.command(cls=_Command, **kwargs)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `kill`, a service manager) raised as an interrupt, so it takes Ctrl-C's path: the
    cleanup that removes partial outputs runs, and a generation in progress stops as cancelled."""


def _terminate(signum, frame):
    raise _Terminated


def _check_numba_threads() -> None:
    """Raise FlashMoeError for a NUMBA_NUM_THREADS that is not a whole number >= 1: numba refuses 0 and
    negative counts with a traceback when it is imported, and falls back to every core, with a warning, for
    text."""
    value = os.environ.get("NUMBA_NUM_THREADS")
    if value is not None and not (value.strip().isdigit() and int(value) >= 1):
        raise FlashMoeError(f"NUMBA_NUM_THREADS={value!r}: the compute thread count must be a whole number >= 1 "
                            "(unset it to use every core)")


def _user_errors(fn):
    """Turn FlashMoeError into a one-line message and exit code 2 instead of a traceback; SIGTERM into an
    interrupt (see _Terminated) and, where nothing handles it, exit code 143 (128 + SIGTERM) without one."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if isinstance(sys.stdin, io.TextIOWrapper):  # undecodable bytes reach the tokenizer's check (TextError)
            sys.stdin.reconfigure(errors="surrogateescape")  # as lone surrogates, not as a UnicodeDecodeError
        in_main = threading.current_thread() is threading.main_thread()  # only it may set a signal handler
        previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
        try:
            _check_numba_threads()
            return fn(*args, **kwargs)
        except FlashMoeError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        except _Terminated:
            raise typer.Exit(128 + signal.SIGTERM) from None
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


@dataclass(frozen=True)
class EngineOptions:
    """The load_engine options that generate, chat and serve share (`_engine_options` makes them command-line
    options); `**asdict(options)` passes them on."""

    backend: str
    io: str
    max_memory: str | None
    experts_per_token: int | None
    cache_policy: str
    gpu_memory: str | None
    speculate: bool
    activations: str | None
    expert_device: str


# EngineOptions' fields as typer options: name -> (type, option)
_ENGINE_OPTIONS = {
    "backend": (str, typer.Option("numba", help="Compute backend: numba, numpy (reference arithmetic), mlx, cuda "
                                  "(`flashmoe backends`).")),
    "io": (str, typer.Option("pagecache", help="Expert reads: 'pagecache' (OS caches hot experts, used in "
                             "place) or 'direct' (O_DIRECT + flashmoe's own expert cache, which gets what "
                             "--max-memory leaves; none without --max-memory).")),
    "max_memory": (Optional[str], typer.Option(None, help="Memory budget, e.g. 4G: resident weights + KV cache + "
                                               "buffers + expert cache.")),
    "experts_per_token": (Optional[int], typer.Option(None, "--experts-per-token", "-k", min=1,
                                                      help="Override the model's num_experts_per_tok.")),
    "cache_policy": (str, typer.Option(DEFAULT_POLICY, help="Eviction policy of the expert caches "
                                       f"({', '.join(POLICIES)}).")),
    "gpu_memory": (Optional[str], typer.Option(None, help="GPU expert cache size, e.g. 16G (--backend cuda).")),
    "speculate": (bool, typer.Option(False, "--speculate/--no-speculate", help="During each MoE layer, guess the "
                                     "next layer's experts with its router and read them early (pays when reads, "
                                     "not compute, set the pace: docs/benchmarks.md).")),
    "activations": (Optional[str], typer.Option(None, help="'q8' (int8 activations in the quantised mat-vecs, "
                                                "faster) or 'float' (exact float32); default: q8 where the backend "
                                                "and CPU have it.")),
    "expert_device": (str, typer.Option("gpu", help="Decode experts not in GPU memory: 'gpu' (copied there), 'cpu' "
                                        "(computed on the CPU from host memory while the GPU does the rest) or "
                                        "'auto' (the cheaper, by rates measured as it runs); --backend cuda.")),
}


def _shared_options(fields: type, options: dict, argument: str):
    """A decorator giving a command the typer `options` (name -> (type, typer.Option)) after its own in --help;
    they reach the command as one keyword `argument`, an instance of the dataclass `fields`."""

    def decorate(fn):
        signature = inspect.signature(fn, eval_str=True)
        own = [p for name, p in signature.parameters.items() if name != argument]
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
                  for name, (kind, option) in options.items()]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values = fields(**{name: kwargs.pop(name) for name in options})
            return fn(*args, **{argument: values}, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + shared)
        return wrapper

    return decorate


_engine_options = _shared_options(EngineOptions, _ENGINE_OPTIONS, "engine_options")


@dataclass(frozen=True)
class SamplingOptions:
    """The sampling settings that generate and chat share (`_sampling_options`); None means the model's
    generation_config.json, else flashmoe.serve.sampling.FALLBACK. `sampler_for(model_dir, **asdict(options))`."""

    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    seed: int | None


_SAMPLING_OPTIONS = {
    "temperature": (Optional[float], typer.Option(None, help="Sampling temperature; 0 for greedy (default: the "
                                                  "model's generation_config.json, else 0.8).")),
    "top_p": (Optional[float], typer.Option(None, help="Nucleus sampling: keep the smallest set of tokens with "
                                            "this mass (default: generation_config.json, else 0.95).")),
    "top_k": (Optional[int], typer.Option(None, help="Keep only the k most likely tokens; 0 disables (default: "
                                          "generation_config.json, else 40).")),
    "min_p": (Optional[float], typer.Option(None, help="Drop tokens below min_p times the top token's "
                                            "probability (default: generation_config.json, else 0.05).")),
    "repetition_penalty": (Optional[float], typer.Option(None, help="Penalise tokens already in the context; "
                                                         "1.0 disables (default: generation_config.json, else "
                                                         "1.0).")),
    "seed": (Optional[int], typer.Option(None, help="Random seed for reproducible sampling; -1 (or none): a "
                                             "random one.")),
}
_sampling_options = _shared_options(SamplingOptions, _SAMPLING_OPTIONS, "sampling")


@_command()
@_user_errors
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


@_command()
@_user_errors
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


@_command()
@_user_errors
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


@_command()
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


@_command()
@_user_errors
def conformance(
    backend: Optional[str] = typer.Option(None, help="Backend to check (default: every available backend)."),
    full: bool = typer.Option(False, "--full", help="Run the full suite instead of the quick one."),
) -> None:
    """Check backends against the NumPy reference and print a table; records a stamp on success."""
    from flashmoe.conformance.runner import main as conformance_main
    from flashmoe.runtime.load import load_engine

    raise typer.Exit(conformance_main(backend=backend, full=full, make_engine=load_engine))


@_command()
@_user_errors
@_engine_options
@_sampling_options
def generate(
    model_dir: Optional[Path] = typer.Argument(None, help="flashmoe model directory (default: the bundled demo model)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text; '-' reads it from standard input."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=1, help="Maximum number of tokens to generate."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    stats: bool = typer.Option(False, "--stats", help="Print time to first token, tok/s, ms/layer, I/O and hit rate."),
    stats_json: Optional[Path] = typer.Option(None, help="Write the run's statistics as JSON to this file."),
    trace: Optional[Path] = typer.Option(None, help="Write the routing trace (experts, hits, bytes, time per "
                                         "token and layer; docs/formats.md) to this JSONL file."),
    *,
    sampling: SamplingOptions,
    engine_options: EngineOptions,
) -> None:
    """Generate text, streaming routed experts from disk. Ctrl-C stops, prints the statistics so far, exits 130."""
    from contextlib import nullcontext

    from flashmoe.format.atomic import check_writable, write_json_atomic
    from flashmoe.serve.generate import CANCELLED, CONTEXT, check_context, generate_steps
    from flashmoe.runtime.load import default_model_dir, load_engine
    from flashmoe.format.modeldir import ModelDir
    from flashmoe.serve.sampling import sampler_for
    from flashmoe.serve.tokenizer import Tokenizer
    from flashmoe.runtime.trace import record_trace

    for path in (stats_json, trace):
        if path is not None:
            check_writable(path)
    if prompt == "-":
        prompt = sys.stdin.read().removesuffix("\n")
    model = ModelDir.open(model_dir or default_model_dir())
    sampler = sampler_for(model.path, **asdict(sampling))
    tokenizer = Tokenizer(model.path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    prompt_ids = tokenizer.encode(text)
    check_context(model.config, len(prompt_ids))  # before anything is printed
    engine = load_engine(model, context=len(prompt_ids) + max_tokens, **asdict(engine_options))
    if not chat:
        sys.stdout.write(prompt)
    stop = None
    with record_trace(engine, trace, str(model.path)) if trace else nullcontext():
        try:
            for step in generate_steps(engine, tokenizer, prompt_ids, sampler, max_tokens):
                sys.stdout.write(step.text)
                sys.stdout.flush()
                stop = step.stop
        except KeyboardInterrupt:
            stop = CANCELLED
            typer.echo("\n[interrupted]", err=True)
        finally:  # the text ends its line, also when an error line follows it
            sys.stdout.write("\n")
            sys.stdout.flush()
    if stop == CONTEXT:
        typer.echo(f"[stopped: the model's context of {model.config.max_position_embeddings} tokens is full]",
                   err=True)
    if stats:
        typer.echo(f"{engine.stats.summary()}\nstop: {stop}", err=True)
    if stats_json:
        write_json_atomic(stats_json, {**engine.stats.to_dict(), "interrupted": stop == CANCELLED,
                                       "stop_reason": stop})
    if stop == CANCELLED:
        raise typer.Exit(130)


@_command()
@_user_errors
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


@_command()
@_user_errors
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


@_command()
@_user_errors
@_engine_options
@_sampling_options
def chat(
    model_dir: Optional[Path] = typer.Argument(None, help="flashmoe model directory (default: the bundled demo model)."),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=1, help="Longest reply in tokens."),
    think: bool = typer.Option(True, "--think/--no-think", help="Let thinking models reason first (enable_thinking)."),
    context: int = typer.Option(4096, min=1, help="Longest conversation in tokens (capped by the model's context)."),
    *,
    sampling: SamplingOptions,
    engine_options: EngineOptions,
) -> None:
    """Chat in the terminal. The model state is kept between turns: each turn prefills only its new tokens.
    With input from a pipe or file, a message that fails (not UTF-8, a full context) ends the chat: one error
    line, exit code 2, as generate does."""
    from flashmoe.serve.chat import ChatSession, run_repl
    from flashmoe.serve.chat_template import select_template
    from flashmoe.runtime.load import default_model_dir, load_engine
    from flashmoe.format.modeldir import ModelDir
    from flashmoe.serve.sampling import sampler_for
    from flashmoe.serve.tokenizer import Tokenizer, check_text

    if system:
        check_text(system, "--system")  # before the model loads
    model = ModelDir.open(model_dir or default_model_dir())
    tokenizer = Tokenizer(model.path)
    select_template(tokenizer.chat_template)  # no template: the one error line of generate --chat, before loading
    sampler = sampler_for(model.path, **asdict(sampling))
    engine = load_engine(model, context=context, **asdict(engine_options))
    session = ChatSession(engine, tokenizer, sampler, max_tokens=max_tokens, system=system,
                          context=context, template_kwargs={} if think else {"enable_thinking": False})
    run_repl(session, stop_on_error=not sys.stdin.isatty())


@_command()
@_user_errors
@_engine_options
def serve(
    model_dir: Optional[Path] = typer.Argument(None, help="flashmoe model directory (default: the bundled demo model)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0: any free port)."),
    context: int = typer.Option(4096, min=1, help="Longest prompt + completion in tokens (capped by the model's context); sizes the KV-cache budget."),
    api_key: Optional[str] = typer.Option(None, envvar="FLASHMOE_API_KEY", help="Require this key (Authorization: Bearer KEY or x-api-key: KEY) on every endpoint but /health."),
    max_request_bytes: int = typer.Option(4 * 1024 * 1024, min=1, help="Refuse request bodies longer than this (413)."),
    *,
    engine_options: EngineOptions,
) -> None:
    """Serve the model over OpenAI- and Anthropic-compatible HTTP APIs (/v1/chat/completions, /v1/messages, ...)."""
    from flashmoe.serve.server import serve as run_server

    run_server(model_dir, host=host, port=port, context=context, api_key=api_key,
               max_request_bytes=max_request_bytes, echo=lambda line: typer.echo(line, err=True),
               **asdict(engine_options))


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


@_command()
@_user_errors
def backends() -> None:
    """List every backend: available here or why not, the device it computes on, its conformance stamp."""
    import json

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from flashmoe.backends import available_backends, get_backend
    from flashmoe.conformance.runner import REFERENCE_BACKEND, stamp_path

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
        elif stamp_path(name).is_file():
            record = json.loads(stamp_path(name).read_text())
            stamp = f"passed {record['when'][:10]} ({record['cases']} cases)"
        else:
            stamp = "not checked yet " + note(f"{name}: checked on first use, or now with "
                                              f"`flashmoe conformance --backend {name}`")
        table.add_row(*map(escape, (name, available, device, stamp)))
    console = Console()
    console.print(table)
    for i, text in enumerate(notes, 1):
        console.print(escape(f"({i}) {text}"))  # escaped: "pip install 'mlx[cpu]'" is not Rich markup


@_command()
@_user_errors
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
