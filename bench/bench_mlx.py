"""MLX (CPU here) against numba on the same synthetic model, in one run: prefill tok/s and decode ms/layer.

The model is a synthetic flashmoe directory (flashmoe.convert.synth) with a real model's layer shapes — by default
Qwen3.5-35B-A3B's (hidden 2048, 16 q heads / 2 kv heads × 256, GatedDeltaNet 16 k-heads / 32 v-heads ×
128, moe_intermediate 512, k = 8, 4-bit group 64, bf16 scales) — cut to `--layers` layers and `--experts`
experts per layer so it fits any disk. Expert files are read once before timing, so every expert read is
a page-cache hit: the numbers compare compute, not the disk.

For each backend: one warm-up pass (numba compiles, MLX builds its graphs), then a prefill of
`--prompt-tokens` tokens (tok/s = tokens / wall) and `--decode-tokens` single-token steps. Decode ms/layer is
a step's wall time without the final norm + lm_head (the engine's `lm_head` stage) divided by the number
of decoder layers. MLX evaluates lazily, so its per-stage split is not meaningful; wall times are.

Run: `python bench/bench_mlx.py --json bench_mlx.json` (writes the model to --model-dir, default a temp
directory, and reuses it when it exists).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from flashmoe.runtime.load import load_engine
from flashmoe.arch.presets import get_preset
from flashmoe.convert.synth import synth_model


def build_model(directory: Path, preset: str, layers: int, experts: int) -> Path:
    """The synthetic model for this run (reused when `directory` already holds one)."""
    if (directory / "flashmoe.json").exists():
        return directory
    p = get_preset(preset)
    config = p.config_dict(layers)
    config["num_experts"] = experts
    config["num_experts_per_tok"] = min(config["num_experts_per_tok"], experts)
    return synth_model(directory, config, tokenizer=None, bits=4, group_size=64,
                       source={"like": p.name, "bench": "bench_mlx"})


def warm_page_cache(directory: Path) -> None:
    """Read every expert file once so the timed runs hit the page cache."""
    for f in sorted((directory / "experts").iterdir()):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def measure(directory: Path, backend: str, prompt_tokens: int, decode_tokens: int, seed: int) -> dict:
    """Prefill tok/s and decode ms/layer (median over decode steps) of one backend."""
    engine = load_engine(directory, backend=backend, context=prompt_tokens + decode_tokens + 1)
    vocab, layers = engine.cfg.vocab_size, engine.cfg.num_hidden_layers
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, vocab, prompt_tokens)
    steps = rng.integers(0, vocab, decode_tokens)

    warm = engine.new_state()  # warm-up: compile / build every path once, same shapes as the timed run
    engine.forward(prompt, warm)
    engine.forward(steps[:1], warm)

    state = engine.new_state()
    t0 = time.perf_counter()
    engine.forward(prompt, state)
    prefill_s = time.perf_counter() - t0
    per_layer_ms = []
    for tok in steps:
        lm_head_before = engine.stats.stage_s.get("lm_head", 0.0)
        t0 = time.perf_counter()
        engine.forward(np.array([tok]), state)
        wall = time.perf_counter() - t0
        lm_head = engine.stats.stage_s.get("lm_head", 0.0) - lm_head_before
        per_layer_ms.append(1e3 * (wall - lm_head) / layers)
    engine.store.close()
    return {
        "backend": backend,
        "prefill_tokens": prompt_tokens,
        "prefill_s": prefill_s,
        "prefill_tok_s": prompt_tokens / prefill_s,
        "decode_tokens": decode_tokens,
        "decode_ms_per_layer_median": statistics.median(per_layer_ms),
        "decode_ms_per_layer_min": min(per_layer_ms),
    }


def _commit() -> str:
    """The checkout's commit, with "+dirty" when backends/ has uncommitted edits (what was measured)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "backends"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="numba,mlx", help="comma-separated backend names")
    ap.add_argument("--preset", default="qwen3.5-35b-a3b", help="flashmoe preset whose layer shapes to use")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (Qwen3.5: 3 linear + 1 full per 4)")
    ap.add_argument("--experts", type=int, default=64, help="experts per layer written to disk")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "flashmoe-bench-mlx")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    directory = build_model(args.model_dir, args.preset, args.layers, args.experts)
    warm_page_cache(directory)
    results = [measure(directory, b, args.prompt_tokens, args.decode_tokens, args.seed)
               for b in args.backends.split(",")]
    import mlx.core as mx  # only for the record of what ran

    run = {
        "flashmoe_commit": _commit(),
        "numba_threads": os.environ.get("NUMBA_NUM_THREADS", "default"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": sys.version.split()[0], "mlx": mx.__version__,
                    "mlx_device": str(mx.default_device()),
                    "load_average_1m_at_end": os.getloadavg()[0]},  # other processes share the cores
        "model": {"preset": args.preset, "layers": args.layers, "experts": args.experts,
                  "dir": str(directory)},
        "results": results,
    }
    print(f"{'backend':8} {'prefill tok/s':>14} {'decode ms/layer (median)':>25} {'(min)':>8}")
    for r in results:
        print(f"{r['backend']:8} {r['prefill_tok_s']:14.1f} {r['decode_ms_per_layer_median']:25.2f} "
              f"{r['decode_ms_per_layer_min']:8.2f}")
    if args.json:
        args.json.write_text(json.dumps(run, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
