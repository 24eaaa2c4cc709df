"""The numba backend's 4-bit dequantising mat-vec against this machine's memory read bandwidth.

Measured in one run, interleaved round by round so that both sides see the same machine load:

- memory read bandwidth: ``np.add.reduce`` over a 1 GB float32 array (what issue 3 calls the machine's
  memory read bandwidth);
- the numba 4-bit mat-vec (``NumbaBackend.linear``, T = 1, group 64, bf16 scales/biases) on the 397B's
  expert shapes 1024x4096 and 4096x1024 and on an lm_head-sized 248320x4096. Expert-sized weights are
  cycled through a pool of distinct matrices larger than the last-level cache, so every call reads DRAM
  (``cold``); ``hot`` repeats one matrix (L2/L3-resident, the upper bound of the kernel's arithmetic);
- the fused k-expert SwiGLU (``experts_ffn``) for one decode token of the 397B (k = 10, hidden 4096,
  moe_intermediate 1024: 70.8 MB of expert weights), experts cycled through a pool;
- each numba kernel with float and with q8 activations (flashmoe.reference.q8: the input quantised to int8
  per 32 values, integer dot products), with one thread and with numba's default thread count
  (``numba.set_num_threads``);
- the MXFP4 mat-vec (gpt-oss's experts as published: 4.25 bits per weight) beside the 4-bit affine one on
  gpt-oss's 2880x2880 expert shape, both cycled through pools, with float and with q8 activations;
- the fused k-expert FFN of one gpt-oss decode token (k = 4, hidden = moe_intermediate = 2880, biases and the
  clamped SwiGLU) with MXFP4 experts beside 4-bit affine ones, experts cycled through a pool;
- mat-vecs of other widths as GGUF's K-quants import them (6-bit groups of 16, Q6_K: the ffn_down_exps a
  Q4_K_M file keeps; 5-bit groups of 32, Q5_K; 3-bit groups of 16, Q3_K) on the 397B's expert shapes, cycled
  through pools, float and q8 (their scales and biases bf16 here);
- the NumPy backend on one expert matrix, for scale.

Weight bytes are the stored bytes (uint32 words + bf16 scales and biases: 4.5 bits per weight); GB/s is
1e9 bytes per second. Each row gives the median over every call of every round and the best call (on a
shared machine the best call approximates the idle machine; the median is the number to quote). Results
print as a table and, with ``--docs``, replace the generated block of the kernel section of
docs/benchmarks.md. Run when the machine is otherwise idle:
``python bench/bench_kernels.py --docs docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

import numba

from flashmoe.backends import get_backend
from flashmoe.backends.base import ClampedSwiGLU
from flashmoe.format.mxfp4 import SCALE_BIAS, Mxfp4Tensor
from flashmoe.format.quant import QuantizedTensor

GB = 1e9
HIDDEN, MOE_INTER, VOCAB = 4096, 1024, 248320  # Qwen3.5-397B-A17B (model-shapes.md)
K = 10
SQUARE = 2880  # gpt-oss's hidden_size and moe_intermediate_size, its MXFP4 experts' shape (model-shapes.md)
CLAMPED_K = 4  # gpt-oss's num_experts_per_tok
CLAMPED_ACT = ClampedSwiGLU(limit=7.0, alpha=1.702)  # gpt-oss's swiglu_limit and alpha
POOL_BYTES = 256 << 20  # > 8x a 32 MB L3: a cycled pool is read from DRAM
SECTION_START = "<!-- bench_kernels:start -->"
SECTION_END = "<!-- bench_kernels:end -->"


def random_q4(rng: np.random.Generator, out: int, inp: int, group_size: int = 64, bits: int = 4) -> QuantizedTensor:
    """Random `bits`-bit words with bf16 scales/biases of realistic size (codes are uniform, as in a real model)."""
    words = rng.integers(0, 2**32, size=(out, inp * bits // 32), dtype=np.uint32)
    scales = rng.uniform(0.001, 0.003, (out, inp // group_size)).astype(ml_dtypes.bfloat16)
    biases = (-(2 ** (bits - 1) - 0.5) * scales.astype(np.float32)).astype(ml_dtypes.bfloat16)
    return QuantizedTensor(words, scales, biases, bits, group_size)


def clamped_experts(rng: np.random.Generator, weight: Callable, n: int) -> list[dict]:
    """n gpt-oss experts (2880 x 2880 projections made by ``weight(rng, out, in)``, float32 biases)."""
    return [{**{p: weight(rng, SQUARE, SQUARE) for p in ("gate_proj", "up_proj", "down_proj")},
             **{f"{p}.bias": rng.normal(0, 0.02, SQUARE).astype(np.float32)
                for p in ("gate_proj", "up_proj", "down_proj")}} for _ in range(n)]


def random_mxfp4(rng: np.random.Generator, out: int, inp: int) -> Mxfp4Tensor:
    """Random E2M1 codes with E8M0 scales around 2^-7 (weights of std ~0.02)."""
    return Mxfp4Tensor(rng.integers(0, 256, (out, inp // 2), dtype=np.uint8),
                       rng.integers(SCALE_BIAS - 9, SCALE_BIAS - 5, (out, inp // 32), dtype=np.uint8))


def memory_read_seconds(a: np.ndarray) -> float:
    start = time.perf_counter()
    np.add.reduce(a)
    return time.perf_counter() - start


class Cycled:
    """Calls ``fn(item)`` for the next item of a pool on each call; returns the seconds it took."""

    def __init__(self, fn: Callable, items: list):
        self.fn, self.items, self.i = fn, items, 0

    def __call__(self) -> float:
        item = self.items[self.i % len(self.items)]
        self.i += 1
        start = time.perf_counter()
        self.fn(item)
        return time.perf_counter() - start


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, numba {numba.__version__} ({numba.config.NUMBA_NUM_THREADS} threads, "
            f"{numba.threading_layer()} layer), numpy {np.__version__}, Python {platform.python_version()}")


def run(rounds: int, seed: int = 0, threads: int | None = None, only: str | None = None) -> dict:
    rng = np.random.default_rng(seed)
    numba_be, numpy_be = get_backend("numba", "float"), get_backend("numpy")
    numba_q8 = get_backend("numba", "q8")
    x_hidden = rng.standard_normal((1, HIDDEN)).astype(np.float32)
    x_inter = rng.standard_normal((1, MOE_INTER)).astype(np.float32)
    big = np.ones(10**9 // 4, np.float32)

    def pool(out: int, inp: int, each: int, group_size: int = 64, bits: int = 4) -> list:
        return [numba_be.prepare(random_q4(rng, out, inp, group_size, bits)) for _ in range(max(1, POOL_BYTES // each))]

    expert_bytes = HIDDEN * MOE_INTER * 9 // 16  # 4.5 bits per weight
    lm_head = numba_be.prepare(random_q4(rng, VOCAB, HIDDEN))
    lm_head_bytes = VOCAB * HIDDEN * 9 // 16
    up_pool, down_pool = pool(MOE_INTER, HIDDEN, expert_bytes), pool(HIDDEN, MOE_INTER, expert_bytes)
    experts = [{"gate_proj": random_q4(rng, MOE_INTER, HIDDEN), "up_proj": random_q4(rng, MOE_INTER, HIDDEN),
                "down_proj": random_q4(rng, HIDDEN, MOE_INTER)} for _ in range(3 * K)]
    weights = np.full(K, 1.0 / K, np.float32)
    expert_sets = [experts[i * K:(i + 1) * K] for i in range(3)]
    one_raw = random_q4(rng, MOE_INTER, HIDDEN)
    x_square = rng.standard_normal((1, SQUARE)).astype(np.float32)
    mxfp4_bytes, square_q4_bytes = SQUARE * SQUARE * 17 // 32, SQUARE * SQUARE * 9 // 16
    mxfp4_pool = [random_mxfp4(rng, SQUARE, SQUARE) for _ in range(POOL_BYTES // mxfp4_bytes)]
    square_q4_pool = pool(SQUARE, SQUARE, square_q4_bytes)
    n_sets = max(2, POOL_BYTES // (3 * CLAMPED_K * mxfp4_bytes))
    clamped_sets = {fmt: [clamped_experts(rng, make, CLAMPED_K) for _ in range(n_sets)]
                for fmt, make in (("MXFP4", random_mxfp4), ("4-bit", lambda r, o, i: random_q4(r, o, i, 32)))}
    clamped_weights = np.full(CLAMPED_K, 1.0 / CLAMPED_K, np.float32)
    clamped_bytes = {"MXFP4": 3 * CLAMPED_K * mxfp4_bytes, "4-bit": 3 * CLAMPED_K * SQUARE * SQUARE * 5 // 8}
    # GGUF K-quant widths as imported (Q4_K_M files keep some ffn_down_exps as Q6_K): (bits, group, out, in)
    widths = {f"{o}x{i} {b}-bit g{g}": (b, g, o, i) for b, g, o, i in ((6, 16, HIDDEN, MOE_INTER),
                                                                       (5, 32, HIDDEN, MOE_INTER),
                                                                       (3, 16, MOE_INTER, HIDDEN))}
    width_bytes = {name: o * i * b // 8 + o * i // g * 4 for name, (b, g, o, i) in widths.items()}
    width_pools = {name: pool(o, i, width_bytes[name], g, b) for name, (b, g, o, i) in widths.items()
                   if not only or any(re.search(only, f"{a} mat-vec {name} cold") for a in ("float", "q8"))}

    # name -> (seconds-per-call measurer, bytes per call)
    numba_cases: dict[str, tuple[Cycled, int]] = {}
    for be in (numba_be, numba_q8):
        a = be.activations
        numba_cases.update({
            f"{a} mat-vec 1024x4096 cold": (Cycled(lambda w, be=be: be.linear(x_hidden, w), up_pool), expert_bytes),
            f"{a} mat-vec 4096x1024 cold": (Cycled(lambda w, be=be: be.linear(x_inter, w), down_pool), expert_bytes),
            f"{a} mat-vec 248320x4096 (lm_head)": (Cycled(lambda w, be=be: be.linear(x_hidden, w), [lm_head]),
                                                   lm_head_bytes),
            f"{a} mat-vec 1024x4096 hot": (Cycled(lambda w, be=be: be.linear(x_hidden, w), up_pool[:1]), expert_bytes),
            f"{a} mat-vec 4096x1024 hot": (Cycled(lambda w, be=be: be.linear(x_inter, w), down_pool[:1]), expert_bytes),
            f"{a} experts_ffn k={K} (397B layer)": (
                Cycled(lambda es, be=be: be.experts_ffn(x_hidden[0], es, weights), expert_sets), 3 * K * expert_bytes),
            f"{a} mat-vec {SQUARE}x{SQUARE} MXFP4 cold": (
                Cycled(lambda w, be=be: be.linear(x_square, w), mxfp4_pool), mxfp4_bytes),
            f"{a} mat-vec {SQUARE}x{SQUARE} 4-bit cold": (
                Cycled(lambda w, be=be: be.linear(x_square, w), square_q4_pool), square_q4_bytes),
            **{f"{a} mat-vec {name} cold": (Cycled(lambda w, be=be: be.linear(x_inter if w.in_features == MOE_INTER
                                                                               else x_hidden, w), p), width_bytes[name])
               for name, p in width_pools.items()},
            **{f"{a} experts_ffn k={CLAMPED_K} {SQUARE}x{SQUARE} biases + clamped SwiGLU, {fmt} cold": (
                Cycled(lambda es, be=be: be.experts_ffn(x_square[0], es, clamped_weights, act=CLAMPED_ACT), sets),
                clamped_bytes[fmt]) for fmt, sets in clamped_sets.items()},
        })
    cases: dict[str, tuple[Callable[[], float], int, int]] = {  # name -> (measure, bytes, calls per round)
        "memory read (np.add.reduce, 1 GB)": (lambda: memory_read_seconds(big), big.nbytes, 1),
        "numpy backend mat-vec 1024x4096": (Cycled(lambda w: numpy_be.linear(x_hidden, w), [one_raw]),
                                            expert_bytes, 1),
    }
    for t in sorted({1, threads or numba.config.NUMBA_NUM_THREADS}):
        for name, (measure, nbytes) in numba_cases.items():
            if only and not re.search(only, name):
                continue
            calls = 1 if "lm_head" in name else 20
            cases[f"numba {name}, {t} thread{'s' * (t > 1)}"] = (
                functools.partial(_with_threads, t, measure), nbytes, calls)
    return _timed(cases, rounds)


def _timed(cases: dict[str, tuple[Callable[[], float], int, int]], rounds: int) -> dict:
    """Time `cases` (name -> (seconds-per-call measurer, bytes per call, calls per round); the first the memory
    read, which the others are compared with) over interleaved rounds, after one warm-up call each."""
    for measure, _, _ in cases.values():  # compile and fault every page in before timing
        measure()
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (measure, _, calls) in cases.items():
            times[name] += [measure() for _ in range(calls)]
    rows = []
    for name, (_, nbytes, _) in cases.items():
        t, best = statistics.median(times[name]), min(times[name])
        rows.append({"name": name, "bytes": nbytes, "median_s": t, "best_s": best, "gb_s": nbytes / t / GB,
                     "best_gb_s": nbytes / best / GB})
    mem, mem_best = rows[0]["gb_s"], rows[0]["best_gb_s"]
    for r in rows:
        r["vs_memory"], r["best_vs_memory"] = r["gb_s"] / mem, r["best_gb_s"] / mem_best
    return {"machine": machine_line(), "rounds": rounds, "command": " ".join(["python"] + sys.argv),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows,
            "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)]}


def _with_threads(threads: int, measure: Callable[[], float]) -> float:
    numba.set_num_threads(threads)
    try:
        return measure()
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def markdown(result: dict) -> str:
    lines = [
        f"Command: `{result['command']}` ({result['when']}); {result['rounds']} interleaved rounds.",
        f"Machine: {result['machine']}; 1-minute load average {result['load_average'][0]} before and "
        f"{result['load_average'][1]} after the timed rounds (other jobs share the machine).",
        "",
        "| kernel | bytes per call | median time | GB/s (median) | of memory read bandwidth | best call: GB/s, of best memory read |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        t = r["median_s"]
        t_text = f"{t * 1e3:.1f} ms" if t >= 1e-3 else f"{t * 1e6:.0f} µs"
        lines.append(f"| {r['name']} | {r['bytes'] / 1e6:.1f} MB | {t_text} | {r['gb_s']:.2f} | "
                     f"{100 * r['vs_memory']:.0f}% | {r['best_gb_s']:.2f}, {100 * r['best_vs_memory']:.0f}% |")
    return "\n".join(lines) + "\n"


def write_docs(path: Path, body: str) -> None:
    """Replace the text between the kernel section's markers (add the section if absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{SECTION_START}\n{body}{SECTION_END}"
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        text = head + block + rest.split(SECTION_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Kernels (numba backend)\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds; medians are reported")
    ap.add_argument("--json", type=Path, help="also write the result as JSON here")
    ap.add_argument("--docs", type=Path, help="replace the kernel results in this Markdown file")
    ap.add_argument("--threads", type=int, default=None, help="the many-thread rows' count (default: numba's)")
    ap.add_argument("--only", help="time only the numba rows whose name matches this regular expression")
    args = ap.parse_args(argv)
    result = run(args.rounds, threads=args.threads, only=args.only)
    text = markdown(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.docs:
        write_docs(args.docs, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
