"""What the commands of `flashmoe` share: user errors and SIGTERM as one error line and an exit code
(`user_errors`), and the engine, sampling and compute-thread options of generate, chat and serve, defined
once."""

from __future__ import annotations

import functools
import inspect
import io
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import typer

from flashmoe.errors import FlashMoeError, Terminated
from flashmoe.runtime.eviction import DEFAULT_POLICY, POLICIES


class Command(typer.core.TyperCommand):
    """A command whose help shows flags as flags: typer's rich help prints a flag's type after it
    (`--stats <bool>`), which reads as if the flag took a value."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


def _terminate(signum, frame):
    raise Terminated


def _check_numba_threads() -> None:
    """Raise FlashMoeError for a NUMBA_NUM_THREADS that is not a whole number >= 1: numba refuses 0 and
    negative counts with a traceback when it is imported, and falls back to every core, with a warning, for
    text."""
    value = os.environ.get("NUMBA_NUM_THREADS")
    if value is not None and not (value.strip().isdigit() and int(value) >= 1):
        raise FlashMoeError(f"NUMBA_NUM_THREADS={value!r}: the compute thread count must be a whole number >= 1 "
                            "(unset it to use every core)")


def user_errors(fn):
    """Turn FlashMoeError into a one-line message and exit code 2 instead of a traceback; SIGTERM into an
    interrupt (see Terminated) and, where nothing handles it, exit code 143 (128 + SIGTERM) without one."""

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
        except Terminated:
            raise typer.Exit(128 + signal.SIGTERM) from None
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


@dataclass(frozen=True)
class EngineOptions:
    """The load_engine options that generate, chat and serve share (`engine_options` makes them command-line
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
                                                "and CPU have it. With --expert-device cpu or auto: the CPU way's "
                                                "(default float).")),
    "expert_device": (str, typer.Option("gpu", help="Decode experts not in GPU memory: 'gpu' (copied there), 'cpu' "
                                        "(computed on the CPU from host memory while the GPU does the rest) or "
                                        "'auto' (the cheaper, by rates measured as it runs); --backend cuda.")),
}


def _shared_options(take: Callable, options: dict, argument: str | None):
    """A decorator giving a command the typer `options` (name -> (type, typer.Option)) after its own in --help;
    their values go to `take` as keywords before the command runs, and what it returns reaches the command as
    the keyword `argument` (None: not passed on)."""

    def decorate(fn):
        signature = inspect.signature(fn, eval_str=True)
        own = [p for name, p in signature.parameters.items() if name != argument]
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
                  for name, (kind, option) in options.items()]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values = take(**{name: kwargs.pop(name) for name in options})
            if argument is not None:
                kwargs[argument] = values
            return fn(*args, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + shared)
        return wrapper

    return decorate


engine_options = _shared_options(EngineOptions, _ENGINE_OPTIONS, "engine_options")


@dataclass(frozen=True)
class SamplingOptions:
    """The sampling settings that generate and chat share (`sampling_options`); None means the model's
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
sampling_options = _shared_options(SamplingOptions, _SAMPLING_OPTIONS, "sampling")


def set_compute_threads(threads: int | None) -> None:
    """Size numba's thread pool, which computes the numba backend's kernels (and the cuda backend's experts
    on the CPU), to `threads`; None keeps numba's default: every core, or NUMBA_NUM_THREADS where set. numba
    reads the size when it is imported, which the commands leave to the engine's loading.

    Raises FlashMoeError naming --threads for a count outside 1..os.cpu_count(), or for one other than the
    pool size of a numba this process imported earlier (a caller of the command in the same process)."""
    if threads is None:
        return
    cores = os.cpu_count() or 1
    if not 1 <= threads <= cores:
        raise FlashMoeError(f"--threads {threads}: the compute thread count must be between 1 and {cores} (the "
                            "machine's cores)")
    numba = sys.modules.get("numba")
    if numba is not None and numba.config.NUMBA_NUM_THREADS != threads:
        raise FlashMoeError(f"--threads {threads}: numba was imported into this process earlier, with "
                            f"{numba.config.NUMBA_NUM_THREADS} threads; give the option in a process of its own")
    os.environ["NUMBA_NUM_THREADS"] = str(threads)


compute_threads = _shared_options(set_compute_threads, {
    "threads": (Optional[int], typer.Option(None, "--threads", "-t", help="Compute threads: the size of numba's "
                                            "thread pool, as llama.cpp's -t (default: every core, or "
                                            "NUMBA_NUM_THREADS where set).")),
}, None)
