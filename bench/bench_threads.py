"""numba's pool against one thread, on a decode-shaped loop: which to use on this machine, as it is loaded now.

A decode-shaped loop on the Qwen3.5-397B expert shapes (model-shapes.md): each step makes four 1024x4096 and
four 4096x1024 4-bit mat-vecs (``NumbaBackend.linear``, T = 1, weights cycled through a pool of 64 each) and
one fused k = 10 expert call (``experts_ffn``), each after 50 us of Python (a decode step's interpreter work
between kernels, during which the pool's workers go idle). Two ways, interleaved round by round, each for
``--seconds`` per round:

- ``pool``: the backend as it is (calls of at least PARALLEL_MIN_WORK multiply-adds on numba's pool);
- ``one thread``: ``numba.set_num_threads(1)``, what ``NUMBA_NUM_THREADS=1`` gives.

Prints milliseconds per step (median, mean, best) and the 1-minute load average; on a shared machine the
mean is the number that decides throughput. If one thread wins, run flashmoe with ``NUMBA_NUM_THREADS=1``. ``python bench/bench_threads.py --rounds 3 --seconds 3``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import HIDDEN, K, MOE_INTER, random_q4  # noqa: E402

from flashmoe.backends import get_backend  # noqa: E402


def _python_work(seconds: float = 50e-6) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def run(rounds: int, seconds: float, seed: int = 0) -> dict[str, list[float]]:
    """Seconds per step of each way, over every step of every round."""
    be = get_backend("numba")
    rng = np.random.default_rng(seed)
    x_hidden = rng.standard_normal((1, HIDDEN)).astype(np.float32)
    x_inter = rng.standard_normal((1, MOE_INTER)).astype(np.float32)
    up = [be.prepare(random_q4(rng, MOE_INTER, HIDDEN)) for _ in range(64)]
    down = [be.prepare(random_q4(rng, HIDDEN, MOE_INTER)) for _ in range(64)]
    experts = [{"gate_proj": random_q4(rng, MOE_INTER, HIDDEN), "up_proj": random_q4(rng, MOE_INTER, HIDDEN),
                "down_proj": random_q4(rng, HIDDEN, MOE_INTER)} for _ in range(2 * K)]
    weights = np.full(K, 1.0 / K, np.float32)
    count = [0]

    def step() -> None:
        for _ in range(4):
            i = count[0] = count[0] + 1
            _python_work()
            be.linear(x_hidden, up[i % 64])
            _python_work()
            be.linear(x_inter, down[i % 64])
        _python_work()
        be.experts_ffn(x_hidden[0], experts[(count[0] % 2) * K:(count[0] % 2 + 1) * K], weights)

    threads = numba.get_num_threads()
    ways = {"pool": threads, "one thread": 1}
    times: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for n in ways.values():  # compile before timing
            numba.set_num_threads(n)
            step()
        for _ in range(rounds):
            for name, n in ways.items():
                numba.set_num_threads(n)
                end = time.perf_counter() + seconds
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - t0)
    finally:
        numba.set_num_threads(threads)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per way and round")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    times = run(args.rounds, args.seconds)
    print(f"numba {numba.get_num_threads()} threads; 1-minute load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    for name, ts in times.items():
        print(f"{name:10s} {len(ts):4d} steps; ms per step: median {1e3 * statistics.median(ts):.2f}, "
              f"mean {1e3 * statistics.mean(ts):.2f}, best {1e3 * min(ts):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
