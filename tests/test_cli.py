"""The `flashmoe` command line as a whole (each command's own behaviour is tested beside its module)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
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


@pytest.mark.parametrize("command", [["generate", "-p", "hi"], ["chat"], ["serve"]])
def test_a_thread_count_outside_one_to_the_machines_cores_is_one_error_line_naming_threads(command):
    cores = os.cpu_count()
    for threads in (0, -1, cores + 1):
        result = CliRunner().invoke(app, [*command, "--threads", str(threads)])
        assert (result.exit_code, result.stderr) == (2, f"error: --threads {threads}: the compute thread count must "
                                                        f"be between 1 and {cores} (the machine's cores)\n")


#: The command line in a process of its own, whose load_engine prints numba's pool size and the thread count
#: its calling thread computes with (serve's worker thread for serve), then stops.
_REPORT_NUMBA_THREADS = """
import flashmoe.runtime.load as load
def report(*args, **kwargs):
    import numba
    print(numba.config.NUMBA_NUM_THREADS, numba.get_num_threads())
    raise SystemExit(0)
load.load_engine = report
from flashmoe.cli import app; app()
"""


@pytest.mark.parametrize("command, option, threads", [  # chat takes the same decorator as these two
    (["generate", "-p", "hi"], ["-t", "1"], 1), (["serve"], ["--threads", "1"], 1),
    (["generate", "-p", "hi"], [], os.cpu_count()),
])
def test_threads_sizes_numbas_pool_and_every_core_is_the_default(command, option, threads):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", _REPORT_NUMBA_THREADS, *command, "--backend", "numpy", *option],
                            env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (0, f"{threads} {threads}\n"), result.stderr
