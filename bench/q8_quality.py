"""q8 against float activations on the demo model: greedy tokens and held-out perplexity, one run.

    python -m flashmoe.bench.q8_quality [--heldout tools/demo-work/tokens/heldout.txt] [--windows 4] [--seq 256]

Both runs use the numba backend on the bundled demo model, differing only in ``activations``. Greedy: the
40-token continuations of tests/test_demo_greedy.py's prompts, compared token by token (the first position
where they part, per prompt). Perplexity: exp(mean next-token cross-entropy) over ``windows`` consecutive
held-out windows of ``seq`` tokens, twice: each window fed one token per forward (every call a decode call),
and each window fed as one prompt (prefill, the logits of every position), since q8 applies to both
(flashmoe.reference.q8). The held-out text is tools/demo_corpus.py's heldout.txt, tokenised with the demo's
tokenizer.
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


def nll(engine, ids: np.ndarray, prefill: bool) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over ``ids``, fed one token per forward (decode) or as one
    prompt whose every position's logits are kept (prefill); (sum, count)."""
    state = engine.new_state()
    if prefill:
        logits = np.asarray(engine.forward(ids[:-1], state, all_logits=True), np.float64)
    else:
        logits = np.concatenate([engine.forward(ids[t : t + 1], state) for t in range(len(ids) - 1)]).astype(np.float64)
    m = logits.max(-1)
    total = m + np.log(np.exp(logits - m[:, None]).sum(-1)) - logits[np.arange(len(ids) - 1), ids[1:]]
    return float(total.sum()), len(ids) - 1


def measure(heldout: Path, windows: int, seq: int) -> dict:
    engines = {mode: load_engine(None, backend="numba", activations=mode) for mode in ("float", "q8")}
    tok = Tokenizer(engines["float"].model_dir.path)
    ids = np.asarray(tok.encode(heldout.read_text()), np.int64)[: windows * seq]
    result: dict = {"windows": windows, "seq": seq, "heldout": str(heldout), "greedy": {}, "perplexity": {}}
    for mode, engine in engines.items():
        for feed in ("decode", "prefill"):
            sums = [nll(engine, ids[w * seq : (w + 1) * seq], feed == "prefill") for w in range(windows)]
            result["perplexity"][f"{mode} {feed}"] = math.exp(sum(s for s, _ in sums) / sum(n for _, n in sums))
        result["greedy"][mode] = {p: greedy_ids(engine, tok, p, GREEDY_TOKENS) for p in PROMPTS}
    result["greedy_first_difference"] = {
        p: next((i for i, (a, b) in enumerate(zip(result["greedy"]["float"][p], result["greedy"]["q8"][p])) if a != b),
                None) for p in PROMPTS}
    ppl = result["perplexity"]
    result["perplexity_change"] = {feed: ppl[f"q8 {feed}"] / ppl[f"float {feed}"] - 1 for feed in ("decode", "prefill")}
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
