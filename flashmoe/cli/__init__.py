"""The `flashmoe` command line. Each command is a thin shell over a module that does the work (the commands
live in modules named for what they do: models, generation, measure; what they share in shared); every
FlashMoeError becomes one `error: ...` line on stderr and exit code 2."""

from __future__ import annotations

import typer

from flashmoe.cli import generation, measure, models
from flashmoe.cli.shared import Command

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


# In the order `flashmoe --help` lists them.
for _fn in (models.convert, models.info, models.verify, models.logits, measure.conformance, generation.generate,
            models.synth, measure.bench, generation.chat, generation.serve, measure.backends, measure.plot):
    app.command(cls=Command)(_fn)
