"""The numba backend's compiled kernels come from numba's disk cache in a second process: no kernel of a
decode step is compiled again.

Why the kernels' closures capture only constants (the bit width, whether scales are bf16): numba keys a
cached kernel on its bytecode and on the pickled values of its closure cells. An int or a bool pickles the
same in every process; a dispatcher (another @njit function) or an intrinsic does not, so a kernel whose
closure captured one would miss the cache and be compiled again in every process (6-8 s before the first
token). Helpers a kernel calls are therefore module globals, which are not part of the key. The small-call
serial path (PARALLEL_MIN_WORK) reuses the same compiled kernels under numba.set_num_threads(1), so it adds
nothing to compile or cache (this test's decode of the demo model takes that path for most calls)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("numba", reason="the numba backend needs numba")

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


def test_a_second_process_loads_every_decode_kernel_from_the_cache(tmp_path):
    env = {**os.environ, "NUMBA_DEBUG_CACHE": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
           "FLASHMOE_CACHE_DIR": str(tmp_path / "flashmoe")}
    runs = [subprocess.run([sys.executable, "-c", DECODE_STEP], env=env, capture_output=True, text=True,
                           timeout=1200) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    assert "data saved" in runs[0].stdout  # the first process compiled and stored the kernels
    recompiled = [line for line in runs[1].stdout.splitlines() if "data saved" in line]
    assert recompiled == []
