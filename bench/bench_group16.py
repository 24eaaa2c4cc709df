"""Groups of 16 (llama.cpp's Q2_K/Q3_K/Q6_K, imported exactly) beside groups of 32 on each CPU backend's mat-vec.

The same random 6-bit codes (Q6_K's width) with float32 scales and biases, in groups of 16 and of 32, on a
Qwen3-30B-A3B expert's shapes (768x2048 and 2048x768), one token: the numba kernels with float and with q8
activations, and MLX. MLX's quantized_matmul takes no group of 16, so the MLX backend reads such a weight as
two group-32 products (backends/mlx_backend.py, _small_group_matmul); the alternative it did not take,
dequantising the weight once and multiplying in float32, is the row "mlx g16 as float32". Rounds are
interleaved (every case once per round) so all cases see the same machine load; each row is the median over
rounds. `python bench/bench_group16.py [--rounds 7]`; results in docs/benchmarks.md, "Groups of 16".
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from flashmoe.backends import available_backends, get_backend
from flashmoe.format.quant import QuantizedTensor

SHAPES = ((768, 2048), (2048, 768))
BITS = 6


def weight(rng: np.random.Generator, out: int, inp: int, group: int) -> QuantizedTensor:
    words = rng.integers(0, 2**32, (out, inp * BITS // 32), dtype=np.uint32)
    scales = rng.uniform(0.001, 0.003, (out, inp // group)).astype(np.float32)
    return QuantizedTensor(words, scales, -32 * scales, BITS, group)


def cases(rng: np.random.Generator) -> dict[str, callable]:
    """name -> a call of one mat-vec (each weight prepared once, as the engine does)."""
    out: dict[str, callable] = {}
    backends = [("numba float", get_backend("numba", "float")), ("numba q8", get_backend("numba", "q8"))]
    if available_backends().get("mlx", "missing") is None:
        backends.append(("mlx", get_backend("mlx")))
    for o, i in SHAPES:
        x = rng.standard_normal((1, i)).astype(np.float32)
        for group in (32, 16):
            w = weight(rng, o, i, group)
            for name, be in backends:
                p, xb = be.prepare(w), be.asarray(x)
                out[f"{name} g{group} {o}x{i}"] = lambda be=be, p=p, xb=xb: be.to_numpy(be.linear(xb, p))
            if group == 16 and len(backends) == 3:
                mlx = backends[2][1]
                dense, xb = mlx.prepare(w.dequantize()), mlx.asarray(x)
                out[f"mlx g16 as float32 {o}x{i}"] = lambda p=dense, xb=xb: mlx.to_numpy(mlx.linear(xb, p))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    calls = cases(np.random.default_rng(0))
    for f in calls.values():  # compile and warm up
        f()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, f in calls.items():
            start = time.perf_counter()
            for _ in range(20):
                f()
            times[name].append((time.perf_counter() - start) / 20)
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores, {args.rounds} rounds of 20 calls")
    print("| case | median µs | vs g32 |\n|---|---|---|")
    for name, t in times.items():
        base = name.replace("g16 as float32", "g32").replace("g16", "g32")
        ratio = statistics.median(t) / statistics.median(times[base])
        print(f"| {name} | {1e6 * statistics.median(t):.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
