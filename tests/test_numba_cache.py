"""The numba backend's compiled kernels come from numba's disk cache in a second process: no kernel of a
decode step is compiled again.

Why the kernels' closures capture only constants (the bit width, whether scales are bf16): numba keys a
cached kernel on its bytecode and on the pickled values of its closure cells. An int or a bool pickles the
same in every process; a dispatcher (another @njit function) or an intrinsic does not, so a kernel whose
closure captured one would miss the cache and be compiled again in every process (6-8 s before the first
token). Helpers a kernel calls are therefore module globals, which are not part of the key. The small-call
serial path (PARALLEL_MIN_WORK) reuses the same compiled kernels under numba.set_num_threads(1), so it adds
nothing to compile or cache (this test's decode of the demo model takes that path for most calls).

The first process is this test's own: its decode compiles (and saves) each kernel it lacks, or loads it from
the cache where this run already compiled it, into the cache every process of this checkout shares. A fresh
cache directory would compile every kernel once more (minutes of the suite on 2 cores) to prove the same.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("numba", reason="the numba backend needs numba")
pytestmark = pytest.mark.numba

DECODE_STEP = """
import numpy as np
from flashmoe.serve.generate import generate_steps
from flashmoe.runtime.load import load_engine
from flashmoe.serve.sampling import Sampler
from flashmoe.serve.tokenizer import Tokenizer
from flashmoe.runtime.load import default_model_dir
engine = load_engine(None, backend="numba")
tok = Tokenizer(default_model_dir())
for _ in generate_steps(engine, tok, tok.encode("O Romeo"), Sampler(), 3):
    pass
"""


def test_a_second_process_loads_every_decode_kernel_from_the_cache():
    exec(DECODE_STEP, {})  # this process: every kernel of the decode is now in numba's cache
    run = subprocess.run([sys.executable, "-c", DECODE_STEP], env={**os.environ, "NUMBA_DEBUG_CACHE": "1"},
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "data loaded" in run.stdout  # the second process read its kernels from the cache
    recompiled = [line for line in run.stdout.splitlines() if "data saved" in line]
    assert recompiled == []




def test_numbas_ir_assumption_warning_stays_out_of_the_users_output():
    """numba_q8's inlined row kernels trip numba's pedantic IR check while compiling; its warning printed into
    `flashmoe generate`'s text on a first run (seen 2026-12-07): the kernel cache module ignores that category,
    and only that one."""
    import warnings

    from numba.core.errors import NumbaIRAssumptionWarning, NumbaWarning

    import flashmoe.backends.numba_cache  # noqa: F401  (installs the filter on import)

    with warnings.catch_warnings(record=True) as seen:  # keeps the installed filters, restores them afterwards
        warnings.warn(NumbaIRAssumptionWarning("variable 'bias.1' is not in scope"))
        warnings.warn(NumbaWarning("another numba warning"))
    assert len(seen) == 1 and "another numba warning" in str(seen[0].message)  # numba adds terminal colours
