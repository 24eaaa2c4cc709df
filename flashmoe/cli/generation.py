"""The commands that run a model: generate, chat and serve."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from flashmoe.cli.shared import (EngineOptions, SamplingOptions, compute_threads, engine_options, sampling_options,
                                 user_errors)
from flashmoe.errors import Terminated


@user_errors
@compute_threads
@engine_options
@sampling_options
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
    """Generate text, streaming routed experts from disk. Ctrl-C stops, prints the statistics so far, exits 130;
    SIGTERM stops, exits 143, and writes no --stats-json or --trace file."""
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
        except Terminated:  # no statistics and no trace of a run cut short (user_errors: exit code 143)
            raise
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


@user_errors
@compute_threads
@engine_options
@sampling_options
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


@user_errors
@compute_threads
@engine_options
def serve(
    model_dir: Optional[Path] = typer.Argument(None, help="flashmoe model directory (default: the bundled demo model)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0: any free port)."),
    context: Optional[int] = typer.Option(None, min=1, help="Longest prompt + completion in tokens (default 4096; capped by the model's context); sizes the KV-cache budget."),
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
