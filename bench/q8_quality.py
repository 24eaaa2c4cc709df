"""q8 against float activations on the demo model: greedy tokens and held-out perplexity, one run.

    python -m flashmoe.bench.q8_quality [--heldout tools/demo-work/tokens/heldout.txt] [--windows 4] [--seq 256]

Both runs use the numba backend on the bundled demo model, differing only in ``activations``. Greedy: the
40-token continuations of tests/test_demo_greedy.py's prompts, compared token by token (the first position
where they part, per prompt). Perplexity: exp(mean next-token cross-entropy) over ``windows`` consecutive
held-out windows of ``seq`` tokens, each fed one token per forward (decode), since q8 applies to decode-sized
calls (flashmoe.reference.q8.Q8_MAX_TOKENS) and a prompt's prefill stays float. The held-out text is
tools/demo_corpus.py's heldout.txt, tokenised with the demo's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from flashmoe.runtime.load import load_engine
from flashmoe.serve.tokenizer import Tokenizer

PROMPTS = ["The old house stood", "And God said,", "KING HENRY.\n"]
GREEDY_TOKENS = 40


def greedy_ids(engine, tok: Tokenizer, prompt: str, n: int) -> list[int]:
    """n greedy token ids after ``prompt`` (prefill, then one token per forward)."""
    state = engine.new_state()
    logits = engine.forward(np.asarray(tok.encode(prompt), np.int64), state)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits[-1])))
        logits = engine.forward(np.asarray(out[-1:], np.int64), state)
    return out


def decode_nll(engine, ids: np.ndarray) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over ``ids``, fed one token per forward; (sum, count)."""
    state = engine.new_state()
    total = 0.0
    for t in range(len(ids) - 1):
        logits = np.asarray(engine.forward(ids[t : t + 1], state)[-1], np.float64)
        m = logits.max()
        total += m + math.log(np.exp(logits - m).sum()) - logits[ids[t + 1]]
    return total, len(ids) - 1


def measure(heldout: Path, windows: int, seq: int) -> dict:
    engines = {mode: load_engine(None, backend="numba", activations=mode) for mode in ("float", "q8")}
    tok = Tokenizer(engines["float"].model_dir.path)
    ids = np.asarray(tok.encode(heldout.read_text()), np.int64)[: windows * seq]
    result: dict = {"windows": windows, "seq": seq, "heldout": str(heldout), "greedy": {}, "perplexity": {}}
    for mode, engine in engines.items():
        nll = [decode_nll(engine, ids[w * seq : (w + 1) * seq]) for w in range(windows)]
        result["perplexity"][mode] = math.exp(sum(s for s, _ in nll) / sum(n for _, n in nll))
        result["greedy"][mode] = {p: greedy_ids(engine, tok, p, GREEDY_TOKENS) for p in PROMPTS}
    result["greedy_first_difference"] = {
        p: next((i for i, (a, b) in enumerate(zip(result["greedy"]["float"][p], result["greedy"]["q8"][p])) if a != b),
                None) for p in PROMPTS}
    result["perplexity_change"] = result["perplexity"]["q8"] / result["perplexity"]["float"] - 1
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heldout", type=Path, default=Path("tools/demo-work/tokens/heldout.txt"))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    a = ap.parse_args(argv)
    print(json.dumps(measure(a.heldout, a.windows, a.seq), indent=1))


if __name__ == "__main__":
    main()
