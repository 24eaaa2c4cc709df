"""The bundled demo model's greedy output, byte for byte, on every CPU backend.

tests/data/demo-greedy.json was recorded before the package layout changed (issue 13); any change to the
forward pass, the store or generation that alters one byte of these continuations fails here. Regenerate
it only for a deliberate change of numerics: `python tests/test_demo_greedy.py > tests/data/demo-greedy.json`.
"numba-q8" is the numba backend with q8 activations (flashmoe.reference.q8), recorded when q8 was added and
again when q8 came to prefill too (its "KING HENRY." continuation then changed from token 15 on: the prompt's
prefill had been float; docs/benchmarks.md, "Prefill", measures the quality), and once more when a prompt's
experts went to numba_prefill's grouped kernels (the gated activation and the weighted sum in numba, as in
decode, instead of NumPy: "KING HENRY." from token 15 on); the other entries use float activations.

numba-q8 has one recording per x86 instruction set of its int8 kernels (flashmoe.backends.numba_x86.INT8_INSTRUCTIONS):
its kernels' float sums are reassociated (fastmath `reassoc`) for the host's vector width, so the last bits of
a logit differ between an AVX-512 and an AVX2 machine, and at a near-tie so does a greedy token ("And God
said," parts after " God forbid the God of heaven, God"). Both stay within the q8 reference's tolerance (conformance/test_numba_q8.py); this file
pins each machine kind's bytes. "numba-q8 avx512-vnni" was recorded on a Zen 4 development VM, "numba-q8 avx2"
on a Zen 3 one (2026-12-07). A CPU with neither fails with the command that records it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from flashmoe.backends.numba_x86 import INT8_INSTRUCTIONS
from flashmoe.runtime.load import load_engine
from flashmoe.serve.sampling import Sampler
from flashmoe.serve.generate import generate_steps
from flashmoe.serve.tokenizer import Tokenizer

GOLDEN = Path(__file__).parent / "data" / "demo-greedy.json"
PROMPTS = ["The old house stood", "And God said,", "KING HENRY.\n"]
TOKENS = 40
RUNS = {"numpy": ("numpy", "float"), "numba": ("numba", "float"), "numba-q8": ("numba", "q8")}
RECORDED_AS = {"numba-q8": f"numba-q8 {INT8_INSTRUCTIONS or 'portable'}"}  # the key of a run in GOLDEN
pytestmark = pytest.mark.numba


def greedy(run: str, prompt: str) -> str:
    backend, activations = RUNS[run]
    engine = load_engine(None, backend=backend, activations=activations)
    tok = Tokenizer(engine.model_dir.path)
    steps = generate_steps(engine, tok, tok.encode(prompt), Sampler(temperature=0.0), TOKENS)
    return "".join(s.text for s in steps)


@pytest.mark.parametrize("run", RUNS)
def test_demo_greedy_output_is_byte_identical_to_the_recorded_one(run):
    key = RECORDED_AS.get(run, run)
    recorded = json.loads(GOLDEN.read_text()).get(key)
    if recorded is None:
        pytest.fail(f"{GOLDEN} has no {key!r} recording for this CPU: after checking conformance/test_numba_q8.py "
                    f"passes here, add it with `python tests/test_demo_greedy.py > {GOLDEN.name}.new`")
    assert {p: greedy(run, p) for p in PROMPTS} == recorded


if __name__ == "__main__":  # this machine's runs, beside the other machines' recordings
    golden = json.loads(GOLDEN.read_text())
    golden.update({RECORDED_AS.get(r, r): {p: greedy(r, p) for p in PROMPTS} for r in RUNS})
    json.dump(golden, sys.stdout, indent=1, ensure_ascii=False)
    print()
