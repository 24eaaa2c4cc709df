"""How well can layer L+1's experts be guessed while layer L is still running? (issue 8, "speculative routing")

Reaching the bound max(disk time, compute time) needs layer L+1's reads to start while layer L computes.
The pre-gated MoE idea (Hwang et al., ISCA 2024) is to apply layer L+1's router early, to layer L's MoE
input, and prefetch what it picks. Flash-MoE measured such speculation as a net loss on Apple silicon
(-18% to -38%). Before building it into the engine, this measures what it could gain here, per decode token
and MoE layer L+1 (not the first):

- `overlap`: |guess ∩ actual| / k, the share of layer L+1's expert reads that could have started one
  layer early; `all_k`: how often the guess is exactly right;
- `wasted_bytes_per_token`: bytes a prefetch of the guess would read for nothing (k − overlap experts
  per layer);
- the same two for the trivial guess "the experts this layer used for the previous token" (temporal
  reuse, which a cache already exploits);
- net effect (`--net`): cold decode passes without and with speculative prefetch (`ExpertStore.prefetch` of
  the guess as soon as layer L's MoE starts: page-cache readahead in pagecache mode, reads into the own
  cache in direct mode), alternated A, B, A, B on the same tokens, each after dropping the page cache and
  the own cache; tok/s, I/O wait and bytes from disk per token of each.

The guess uses layer L's normalised MoE input (`post_attention_layernorm` of layer L) with layer L+1's router
weights, read through the engine's private `_moe` / `_w` (a measurement, not a feature). Random weights make
every layer's routing close to uniform and independent of the previous token; whether the residual stream
still lets the router guess ahead is exactly what the number shows. A trained model's figure (the bundled
demo model) is the one that says whether speculation is worth building.

Run: `python -m flashmoe.bench.speculation MODEL_DIR [-k 4] [--tokens 32] [--random-inputs]
[--net --io direct --max-memory 4G] [--json OUT]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from flashmoe.reference.moe import route
from flashmoe.trace import read_trace, record_trace


def _guesser(engine, sink):
    """A replacement for engine._moe that, for decode tokens, applies the next MoE layer's router to this
    layer's MoE input and hands (next layer, guessed ids) to `sink` before running the layer."""
    be, cfg, k, original = engine.backend, engine.cfg, engine.k, engine._moe
    layers = engine.model.moe_layers
    following = dict(zip(layers, layers[1:]))

    def moe(layer: int, x):
        nxt = following.get(layer)
        if nxt is not None and x.shape[0] == 1:
            logits = be.to_numpy(be.linear(x, engine._w[f"layers.{nxt}.mlp.gate.weight"]))
            sink(nxt, route(logits, k, cfg.norm_topk_prob)[0][0])
        return original(layer, x)

    return moe


def _decode(engine, prompt: np.ndarray, tokens: int | np.ndarray, before_token=None) -> None:
    """Prefill `prompt`, then decode: greedy for `tokens` steps (an int), or feeding the given token ids."""
    state = engine.new_state()
    engine.stats.start()
    logits = engine.forward(prompt, state)
    engine.stats.token_done()
    forced = None if isinstance(tokens, int) else tokens
    for i in range(tokens if forced is None else len(forced)):
        if before_token:
            before_token()
        token = int(np.argmax(logits[-1])) if forced is None else int(forced[i])
        logits = engine.forward(np.array([token]), state)
        engine.stats.token_done()


def accuracy(engine, prompt: np.ndarray, tokens: int | np.ndarray) -> dict:
    """Overlap and waste of the early-router guess and of the previous-token guess (module docstring)."""
    k, original = engine.k, engine._moe
    guesses: list[dict[int, np.ndarray]] = []  # per decode token: next layer -> guessed ids
    engine._moe = _guesser(engine, lambda layer, ids: guesses[-1].__setitem__(layer, ids))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.jsonl"
            with record_trace(engine, path):
                _decode(engine, prompt, tokens, before_token=lambda: guesses.append({}))
            header, trace = read_trace(path)
    finally:
        engine._moe = original
    decode = [t for t in trace if not t.prefill]
    row = {layer: j for j, layer in enumerate(header.moe_layers)}
    early, reuse = [], []
    for i, token in enumerate(decode):
        for layer, guess in guesses[i].items():
            actual = set(token.experts[row[layer]].tolist())
            early.append(len(actual & set(guess.tolist())))
            if i > 0:
                reuse.append(len(actual & set(decode[i - 1].experts[row[layer]].tolist())))
    per_token = engine.model.layout.nbytes * (len(header.moe_layers) - 1)

    def summary(overlaps: list[int]) -> dict:
        o = np.asarray(overlaps, dtype=np.float64)
        return {"overlap": float(o.mean() / k), "all_k": float((o == k).mean()),
                "wasted_bytes_per_token": float((k - o).mean() * per_token)}

    return {"decode_tokens": len(decode), "uniform_overlap": k / engine.cfg.num_experts,
            "early_router": summary(early), "previous_token": summary(reuse)}


def net_effect(engine, prompt: np.ndarray, tokens: int | np.ndarray, repeats: int = 2) -> dict:
    """Cold decode without (A) and with (B) speculative prefetch, alternated A, B, A, B; per variant the
    median tok/s and the mean I/O wait and disk bytes per decode token (bench/decode_run.summarise_pass)."""
    from flashmoe.bench.decode_run import summarise_pass

    original, store, stats = engine._moe, engine.store, engine.stats
    speculating = _guesser(engine, store.prefetch)
    runs: dict[str, list[dict]] = {"baseline": [], "prefetch": []}
    for _ in range(repeats):
        for name, moe in (("baseline", original), ("prefetch", speculating)):
            store.clear_cache()
            store.evict_page_cache()
            engine._moe = moe
            first, stages = len(stats.tokens), dict(stats.stage_s)
            try:
                _decode(engine, prompt, tokens)
            finally:
                engine._moe = original
            decode_stages = {s: v - stages.get(s, 0.0) for s, v in stats.stage_s.items()}
            runs[name].append(summarise_pass(stats.tokens[first:], decode_stages, len(engine.model.moe_layers)))
    out = {}
    for name, passes in runs.items():
        out[name] = {"tok_s": float(np.median([p["tok_s"] for p in passes])),
                     "tok_s_runs": [p["tok_s"] for p in passes],
                     "io_wait_ms_per_token": float(np.mean([p["io_wait_ms_per_token"] for p in passes])),
                     "disk_bytes_per_token": float(np.mean([p["disk_bytes_per_token"] for p in passes])),
                     "bytes_read_per_token": float(np.mean([p["bytes_read_per_token"] for p in passes]))}
    out["speedup"] = out["prefetch"]["tok_s"] / out["baseline"]["tok_s"]
    return out


def measure(model_dir: str | Path | None, backend: str = "numba", k: int | None = None, prompt_tokens: int = 8,
            tokens: int = 32, seed: int = 0, net: bool = False, io: str = "pagecache",
            max_memory: str | None = None, random_inputs: bool = False) -> dict:
    """Guess accuracy and, with `net`, the net effect of speculative prefetch, over `tokens` decode tokens
    after a seeded random prompt: greedy (a trained model's own text), or with `random_inputs` seeded random
    token ids (random weights: greedy decoding collapses into one repeated token, see bench/decode_run.py).
    model_dir None: the bundled demo model."""
    from flashmoe.load import load_engine

    engine = load_engine(model_dir, backend=backend, io=io, max_memory=max_memory, experts_per_token=k,
                         context=prompt_tokens + tokens + 1)
    ids = np.random.default_rng(seed).integers(0, engine.cfg.vocab_size, prompt_tokens + tokens)
    prompt = ids[:prompt_tokens]
    tokens = ids[prompt_tokens:] if random_inputs else tokens
    result = {"model": str(model_dir or "demo model"), "k": engine.k, "num_experts": engine.cfg.num_experts,
              "inputs": "random" if random_inputs else "greedy",
              "moe_layers": len(engine.model.moe_layers), "expert_bytes": engine.model.layout.nbytes,
              "io": io, "max_memory": max_memory, **accuracy(engine, prompt, tokens)}
    if net:
        result["net"] = net_effect(engine, prompt, tokens)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="model directory (default: the bundled demo model)")
    ap.add_argument("--backend", default="numba")
    ap.add_argument("-k", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--net", action="store_true", help="also time cold decode without and with prefetch")
    ap.add_argument("--io", default="pagecache", choices=("pagecache", "direct"))
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("--random-inputs", action="store_true", help="decode seeded random ids, not greedy")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    result = measure(a.model, a.backend, a.k, a.prompt_tokens, a.tokens, net=a.net, io=a.io,
                     max_memory=a.max_memory, random_inputs=a.random_inputs)
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
