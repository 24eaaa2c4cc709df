"""The `flashmoe` command line as a whole (each command's own behaviour is tested beside its module)."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from flashmoe import __version__
from flashmoe.cli import app


def test_version_prints_the_package_version_and_exits_0():
    result = CliRunner().invoke(app, ["--version"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, f"flashmoe {__version__}\n", "")
    assert "--version" in CliRunner().invoke(app, ["--help"]).stdout


def test_a_numba_thread_count_numba_would_refuse_is_one_error_line():
    """numba raises ValueError on import for NUMBA_NUM_THREADS=0; a subprocess, since this one has numba
    imported already."""
    for value in ("0", "-2", "many"):
        result = subprocess.run([sys.executable, "-m", "flashmoe", "generate", "-p", "hi", "--max-tokens", "1"],
                                env={**os.environ, "NUMBA_NUM_THREADS": value}, capture_output=True, text=True,
                                timeout=120)
        assert (result.returncode, result.stderr) == (2, f"error: NUMBA_NUM_THREADS={value!r}: the compute thread "
                                                         "count must be a whole number >= 1 (unset it to use every "
                                                         "core)\n")
