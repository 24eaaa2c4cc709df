"""The bundled demo model's greedy output, byte for byte, on every CPU backend.

tests/data/demo-greedy.json was recorded before the package layout changed (issue 13); any change to the
forward pass, the store or generation that alters one byte of these continuations fails here. Regenerate
it only for a deliberate change of numerics: `python tests/test_demo_greedy.py > tests/data/demo-greedy.json`.
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
BACKENDS = ["numpy", "numba"]


def greedy(backend: str, prompt: str) -> str:
    engine = load_engine(None, backend=backend)
    tok = Tokenizer(engine.model_dir.path)
    steps = generate_steps(engine, tok, tok.encode(prompt), Sampler(temperature=0.0), TOKENS)
    return "".join(s.text for s in steps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_demo_greedy_output_is_byte_identical_to_the_recorded_one(backend):
    recorded = json.loads(GOLDEN.read_text())[backend]
    assert {p: greedy(backend, p) for p in PROMPTS} == recorded


if __name__ == "__main__":
    json.dump({b: {p: greedy(b, p) for p in PROMPTS} for b in BACKENDS}, sys.stdout, indent=1, ensure_ascii=False)
    print()
