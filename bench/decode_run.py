"""One decode measurement in a process of its own (peak RSS and memory caps are per process).

`python -m flashmoe.bench.decode_run --model DIR --io direct --max-memory 4G -k 4 --json OUT.json` loads the
model with `load_engine`, runs one throwaway prefill + decode step (one-time kernel loading stays out of
the cold pass), empties the store's own cache and drops the expert files from the page cache
(POSIX_FADV_DONTNEED), then runs the same token sequence in passes:

- `cold`: prefill a seeded random prompt, then decode `--tokens` tokens, one forward per token;
- `warm`: a fresh sequence state, the same prompt and the same tokens again, so every expert it needs was
  read moments ago (direct mode: what the own cache kept; pagecache mode: what the page cache kept).

The decode inputs are seeded random token ids, not the model's own greedy choices: greedy decoding of
random weights falls into repeating one token within a few steps, after which every layer routes to the
same experts and any cache looks perfect (measured: 99% hits on Qwen3-30B shapes). Random inputs keep the
routing near uniform, as random weights should, and are the same in every pass and mode, so the passes and
the modes route to the same experts. Deep random-weight models route most tokens to the same few experts
anyway (their token representations converge with depth: 99% hits on the 48-layer Qwen3-30B shapes), so
`--routing uniform` replaces the router's picks by seeded uniform random ones: the worst case for every
cache, the disk-bound regime. Each pass reports tok/s over the decode tokens (the first
token, which carries prefill, is excluded), time per token split into compute stages, I/O wait and
the rest, expert bytes read and from disk per token, reads and hit rate per token. The process's peak RSS
covers both passes. With --trace, the first pass's routing and store activity (prefill and decode) is written
as a routing trace (flashmoe.runtime.trace.record_trace).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np

from flashmoe.errors import FlashMoeError
from flashmoe.runtime.eviction import DEFAULT_POLICY
from flashmoe.runtime.memory import current_rss_bytes, peak_rss_bytes
from flashmoe.runtime.stats import Counters, TokenRecord
from flashmoe.runtime.trace import record_trace


def _mean_counters(records: list[TokenRecord]) -> dict[str, float]:
    total = Counters()
    for r in records:
        for k, v in asdict(r.counters).items():
            setattr(total, k, getattr(total, k) + v)
    return {k: v / len(records) for k, v in asdict(total).items()}


def summarise_pass(records: list[TokenRecord], stage_s: dict[str, float], num_layers: int) -> dict:
    """Figures of one pass from its token records (the first is prefill + first token) and the compute
    seconds per stage spent in its decode tokens. Times per decode token in ms; bytes per decode token."""
    decode = records[1:]
    n = len(decode)
    wall = sum(r.wall_s for r in decode)
    mean = _mean_counters(decode)
    lookups = mean["hits"] + mean["misses"]
    stage_ms = {k: 1e3 * v / n for k, v in stage_s.items()}
    head_ms = stage_ms.get("lm_head", 0.0)
    wall_ms = 1e3 * wall / n
    compute_ms = 1e3 * mean["compute_s"]
    io_wait_ms = 1e3 * mean["io_wait_s"]
    return {
        "decode_tokens": n,
        "ttft_s": records[0].wall_s,
        "tok_s": n / wall,
        "ms_per_token": wall_ms,
        "compute_ms_per_token": compute_ms,
        "io_wait_ms_per_token": io_wait_ms,
        "other_ms_per_token": wall_ms - compute_ms - io_wait_ms,
        "lm_head_ms_per_token": head_ms,
        # per MoE layer, without the lm_head (which a truncated model does not scale down)
        "ms_per_layer": (wall_ms - head_ms) / num_layers,
        "compute_ms_per_layer": (compute_ms - head_ms) / num_layers,
        "io_wait_ms_per_layer": io_wait_ms / num_layers,
        "stage_ms_per_token": stage_ms,
        "bytes_read_per_token": mean["bytes_read"],
        "disk_bytes_per_token": mean["disk_bytes"],
        "reads_per_token": mean["reads"],
        "guesses_per_token": mean["guesses"],
        "guesses_used_per_token": mean["guesses_used"],
        "guess_wasted_bytes_per_token": mean["guess_wasted_bytes"],
        "hit_rate": mean["hits"] / lookups if lookups else None,
        "decode_token_ms": [1e3 * r.wall_s for r in decode],
        "achieved_gb_s": mean["bytes_read"] / (wall / n) / 1e9,
        "achieved_disk_gb_s": mean["disk_bytes"] / (wall / n) / 1e9,
    }


def decode_inputs(vocab_size: int, prompt_tokens: int, tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids [prompt_tokens], decode ids [tokens]), int64: seeded uniform random token ids, the same
    for every pass, mode and engine (bench/llama_cpp.py feeds llama.cpp these too)."""
    ids = np.random.default_rng(seed).integers(0, vocab_size, prompt_tokens + tokens)
    return ids[:prompt_tokens], ids[prompt_tokens:]


def force_uniform_routing(seed: int) -> None:
    """Replace the engine's router decision with seeded uniformly random top-k picks (weights 1/k), the same
    sequence in every process with the same seed. Hooks `flashmoe.runtime.engine.route` (the engine's name for
    reference.routing.route): a benchmark workload, never a model's behaviour."""
    import flashmoe.runtime.engine as engine_module

    rng = np.random.default_rng([seed, 1])

    def uniform_route(logits: np.ndarray, cfg, k: int) -> tuple[np.ndarray, np.ndarray]:
        t, e = logits.shape
        ids = np.argsort(rng.random((t, e)), axis=-1)[:, :k].astype(np.int64)
        return ids, np.full((t, k), 1.0 / k, dtype=np.float32)

    engine_module.route = uniform_route


def run(model_dir: Path, backend: str, io: str, max_memory: str | None, k: int | None, io_threads: int | None,
        prompt_tokens: int, tokens: int, seed: int, cache_policy: str, passes: list[str],
        trace: Path | None = None, routing: str = "model", speculate: bool = False,
        activations: str | None = None) -> dict:
    """Load, evict the expert files from the page cache, run the passes; the result dict (see module doc).
    routing 'uniform' replaces the router's picks by force_uniform_routing (the warm pass then repeats the
    cold pass's picks, as it would with the model's router). speculate: load_engine's speculative reads of
    the next layer's experts. activations: load_engine's ('float', 'q8', None for the backend's default)."""
    from flashmoe.runtime.load import load_engine

    rss_before = current_rss_bytes()
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    engine = load_engine(model_dir, backend=backend, io=io, max_memory=max_memory, experts_per_token=k,
                         context=prompt_tokens + tokens + 1, cache_policy=cache_policy, threads=io_threads,
                         speculate=speculate, activations=activations)
    load_s = time.perf_counter() - t0
    # One throwaway prefill + decode step first, so one-time costs (numba loading or compiling kernels for
    # these shapes, first-touch of buffers) do not land in the cold pass, which measures the cold disk.
    warmup = engine.new_state()
    engine.forward(np.zeros(2, np.int64), warmup)
    engine.forward(np.zeros(1, np.int64), warmup)
    engine.store.clear_cache()
    engine.store.evict_page_cache()
    stats = engine.stats
    prompt, decode_ids = decode_inputs(engine.cfg.vocab_size, prompt_tokens, tokens, seed)
    results = {}
    for n, name in enumerate(passes):
        if routing == "uniform":
            force_uniform_routing(seed)
        state = engine.new_state()
        first, stages_before = len(stats.tokens), dict(stats.stage_s)
        label = f"{model_dir} (uniform routing)" if routing == "uniform" else str(model_dir)
        with record_trace(engine, trace, label) if trace and n == 0 else nullcontext():
            stats.start()
            engine.forward(prompt, state)
            stats.token_done()
            stages_at_decode = dict(stats.stage_s)
            for token in decode_ids:
                engine.forward(token[None], state)
                stats.token_done()
        decode_stages = {s: v - stages_at_decode.get(s, 0.0) for s, v in stats.stage_s.items()}
        results[name] = summarise_pass(stats.tokens[first:], decode_stages, len(engine.model_dir.moe_layers))
        results[name]["prefill_stage_s"] = {s: v - stages_before.get(s, 0.0) for s, v in stages_at_decode.items()}
    store = engine.store
    return {
        "model": str(model_dir), "backend": backend, "activations": engine.backend.activations, "io": io, "o_direct": getattr(store, "direct", None),
        "max_memory": max_memory, "k": engine.k, "io_threads": store.threads,
        "compute_threads": int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count() or 1)),
        "cache_policy": cache_policy, "prompt_tokens": prompt_tokens, "tokens": tokens, "seed": seed,
        "routing": routing, "speculate": speculate,
        "moe_layers": len(engine.model_dir.moe_layers), "num_hidden_layers": engine.cfg.num_hidden_layers,
        "expert_bytes": engine.model_dir.layout.nbytes, "expert_stride": engine.model_dir.layout.stride,
        "resident_bytes": engine.model_dir.resident_nbytes, "load_s": load_s, "rss_before_load": rss_before,
        "peak_rss_bytes": peak_rss_bytes(), "passes": results,
        # other processes compete for the same cores; the 1-minute load average shows how much
        "loadavg_1min": [load_before, os.getloadavg()[0]],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--io", default="pagecache", choices=("pagecache", "direct"))
    ap.add_argument("--max-memory", default=None)
    ap.add_argument("-k", "--experts-per-token", type=int, default=None)
    ap.add_argument("--io-threads", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-policy", default=DEFAULT_POLICY)
    ap.add_argument("--passes", default="cold,warm")
    ap.add_argument("--trace", type=Path, default=None)
    ap.add_argument("--routing", default="model", choices=("model", "uniform"))
    ap.add_argument("--speculate", action="store_true", help="read a guess of the next layer's experts early")
    ap.add_argument("--activations", default=None, choices=("float", "q8"))
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    try:
        result = run(a.model, a.backend, a.io, a.max_memory, a.experts_per_token, a.io_threads, a.prompt_tokens,
                     a.tokens, a.seed, a.cache_policy, a.passes.split(","), a.trace, a.routing, a.speculate,
                     a.activations)
    except FlashMoeError as e:  # e.g. a budget too small for the model: the parent shows this one line
        sys.exit(f"error: {e}")
    a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
