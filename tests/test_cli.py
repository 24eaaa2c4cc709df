"""The `flashmoe` command line as a whole (each command's own behaviour is tested beside its module)."""

from __future__ import annotations

from typer.testing import CliRunner

from flashmoe import __version__
from flashmoe.cli import app


def test_version_prints_the_package_version_and_exits_0():
    result = CliRunner().invoke(app, ["--version"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, f"flashmoe {__version__}\n", "")
    assert "--version" in CliRunner().invoke(app, ["--help"]).stdout
