"""The bundled demo model's greedy output, byte for byte, on every CPU backend.

tests/data/demo-greedy.json was recorded before the package layout changed (issue 13); any change to the
forward pass, the store or generation that alters one byte of these continuations fails here. Regenerate
it only for a deliberate change of numerics: `python tests/test_demo_greedy.py > tests/data/demo-greedy.json`.
"numba-q8" is the numba backend with q8 activations (flashmoe.reference.q8), recorded when q8 was added and
again when q8 came to prefill too (its "KING HENRY." continuation then changed from token 15 on: the prompt's
prefill had been float; docs/benchmarks.md, "Prefill", measures the quality), and once more when a prompt's
experts went to numba_prefill's grouped kernels (the gated activation and the weighted sum in numba, as in
decode, instead of NumPy: "KING HENRY." from token 15 on); the other entries use float activations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from flashmoe.runtime.load import load_engine
from flashmoe.serve.sampling import Sampler
from flashmoe.serve.generate import generate_steps
from flashmoe.serve.tokenizer import Tokenizer

GOLDEN = Path(__file__).parent / "data" / "demo-greedy.json"
PROMPTS = ["The old house stood", "And God said,", "KING HENRY.\n"]
TOKENS = 40
RUNS = {"numpy": ("numpy", "float"), "numba": ("numba", "float"), "numba-q8": ("numba", "q8")}
pytestmark = pytest.mark.numba


def greedy(run: str, prompt: str) -> str:
    backend, activations = RUNS[run]
    engine = load_engine(None, backend=backend, activations=activations)
    tok = Tokenizer(engine.model_dir.path)
    steps = generate_steps(engine, tok, tok.encode(prompt), Sampler(temperature=0.0), TOKENS)
    return "".join(s.text for s in steps)


@pytest.mark.parametrize("run", RUNS)
def test_demo_greedy_output_is_byte_identical_to_the_recorded_one(run):
    recorded = json.loads(GOLDEN.read_text())[run]
    assert {p: greedy(run, p) for p in PROMPTS} == recorded


if __name__ == "__main__":
    json.dump({r: {p: greedy(r, p) for p in PROMPTS} for r in RUNS}, sys.stdout, indent=1, ensure_ascii=False)
    print()
