"""Does speculating on the next layer's experts pay? (issue 8, "speculative routing")

Reaching the bound max(disk time, compute time) needs layer L+1's reads to run while layer L and layer L+1's
attention compute. With `load_engine(..., speculate=True)` the engine applies layer L+1's router to layer L's
MoE input (pre-gated MoE, Hwang et al., ISCA 2024) and the store reads the top-k guesses behind layer L's own
reads, two at a time, in 1 MiB pieces that stop as soon as layer L+1's real routing shows a guess wrong
(flashmoe/runtime/engine.py, ExpertStore.speculate). Flash-MoE measured a simpler prefetch as a net loss on Apple
silicon (-18% to -38%). This measures, in one process, over the same tokens:

- accuracy: the share of guesses a fetch then used (`guesses_used / guesses`; uniform routing would give
  k / num_experts), and the bytes the wrong ones read before they were stopped;
- net effect: cold decode passes with speculation off (A) and on (B), alternated A, B, A, B, each after
  emptying the own cache and dropping the expert files from the page cache: tok/s, I/O wait, and bytes
  from disk per token (bench/decode_run.summarise_pass).

Run: `python -m flashmoe.bench.speculation [MODEL_DIR] [-k 4] [--tokens 32] [--random-inputs]
[--io direct --max-memory 4G] [--repeats 2] [--json OUT]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from flashmoe.bench.decode_run import summarise_pass


def _decode(engine, prompt: np.ndarray, tokens: int | np.ndarray) -> None:
    """Prefill `prompt`, then decode: greedy for `tokens` steps (an int), or feeding the given token ids."""
    state = engine.new_state()
    engine.stats.start()
    logits = engine.forward(prompt, state)
    engine.stats.token_done()
    forced = None if isinstance(tokens, int) else tokens
    for i in range(tokens if forced is None else len(forced)):
        token = int(np.argmax(logits[-1])) if forced is None else int(forced[i])
        logits = engine.forward(np.array([token]), state)
        engine.stats.token_done()


def compare(engine, prompt: np.ndarray, tokens: int | np.ndarray, repeats: int = 2) -> dict:
    """Cold passes without and with speculation, alternated; per variant the median tok/s, the mean I/O
    wait and bytes per decode token, and (speculation on) the guesses' accuracy and waste."""
    store, stats, slots = engine.store, engine.stats, engine.k
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(repeats):
        for name in runs:
            store.guess_slots = slots if name == "on" else 0
            store.clear_cache()
            store.evict_page_cache()
            first, stages, before = len(stats.tokens), dict(stats.stage_s), dataclasses.replace(stats.totals)
            _decode(engine, prompt, tokens)
            store.clear_cache()  # stops the last guesses and counts what they read
            decode_stages = {s: v - stages.get(s, 0.0) for s, v in stats.stage_s.items()}
            summary = summarise_pass(stats.tokens[first:], decode_stages, len(engine.model_dir.moe_layers))
            spent = stats.totals - before
            summary["guesses"], summary["guesses_used"] = spent.guesses, spent.guesses_used
            summary["guess_wasted_bytes"] = spent.guess_wasted_bytes
            runs[name].append(summary)
    out = {}
    for name, passes in runs.items():
        guesses = sum(p["guesses"] for p in passes)
        out[name] = {"tok_s": float(np.median([p["tok_s"] for p in passes])),
                     "tok_s_runs": [p["tok_s"] for p in passes],
                     "io_wait_ms_per_token": float(np.mean([p["io_wait_ms_per_token"] for p in passes])),
                     "compute_ms_per_token": float(np.mean([p["compute_ms_per_token"] for p in passes])),
                     "disk_bytes_per_token": float(np.mean([p["disk_bytes_per_token"] for p in passes])),
                     "guess_accuracy": sum(p["guesses_used"] for p in passes) / guesses if guesses else None,
                     "guess_wasted_bytes": sum(p["guess_wasted_bytes"] for p in passes) / len(passes)}
    out["speedup"] = out["on"]["tok_s"] / out["off"]["tok_s"]
    return out


def measure(model_dir: str | Path | None, backend: str = "numba", k: int | None = None, prompt_tokens: int = 8,
            tokens: int = 32, seed: int = 0, io: str = "pagecache", max_memory: str | None = None,
            random_inputs: bool = False, repeats: int = 2) -> dict:
    """`compare` over `tokens` decode tokens after a seeded random prompt: greedy (a trained model's own
    text), or with `random_inputs` seeded random token ids (random weights: greedy decoding collapses into
    one repeated token, see bench/decode_run.py). model_dir None: the bundled demo model."""
    from flashmoe.runtime.load import load_engine

    engine = load_engine(model_dir, backend=backend, io=io, max_memory=max_memory, experts_per_token=k,
                         context=prompt_tokens + tokens + 1, speculate=True)
    ids = np.random.default_rng(seed).integers(0, engine.cfg.vocab_size, prompt_tokens + tokens)
    prompt = ids[:prompt_tokens]
    _decode(engine, prompt[:2], 1)  # one-time kernel loading stays out of the timed passes
    result = {"model": str(model_dir or "demo model"), "backend": backend, "k": engine.k,
              "num_experts": engine.cfg.num_experts, "uniform_accuracy": engine.k / engine.cfg.num_experts,
              "inputs": "random" if random_inputs else "greedy", "moe_layers": len(engine.model_dir.moe_layers),
              "expert_bytes": engine.model_dir.layout.nbytes, "io": io, "max_memory": max_memory}
    result.update(compare(engine, prompt, ids[prompt_tokens:] if random_inputs else tokens, repeats))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="model directory (default: the bundled demo model)")
    ap.add_argument("--backend", default="numba")
    ap.add_argument("-k", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--io", default="pagecache", choices=("pagecache", "direct"))
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--random-inputs", action="store_true", help="decode seeded random ids, not greedy")
    ap.add_argument("--repeats", type=int, default=2, help="A/B pairs of cold passes")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    result = measure(a.model, a.backend, a.k, a.prompt_tokens, a.tokens, io=a.io, max_memory=a.max_memory,
                     random_inputs=a.random_inputs, repeats=a.repeats)
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
