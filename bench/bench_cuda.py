"""Decode speed of the CUDA backend against its bound and against another backend, in one process.

`python -m flashmoe.bench.bench_cuda --model DIR --backends cuda,numba --tokens 8 --json OUT.json`

For each backend: build an engine (the CUDA backend's expert read buffers are pinned host memory), drop the
expert files from the page cache, then two passes of the same greedy sequence: `cold` (experts from disk)
and `warm` (the same experts again, now in the page cache: PCIe and the GPU set the pace). Each pass reports
tok/s and ms per MoE layer (flashmoe.bench.decode_run.summarise_pass).

The bound is measured in the same run, per decode token, from the bytes the pass moved:
`max(read, host->device copy, CPU, GPU compute)` with read = disk bytes / cold read rate + the other expert
bytes / page-cache read rate (both through the store into pinned buffers), copy = the expert bytes copied to
the GPU / pinned host->device rate, CPU = the expert bytes read but not copied (computed on the CPU:
`--expert-device cpu`) / the host's memory read rate on every core, GPU = (resident + the bytes of the
experts the GPU computes, whether from its VRAM tier or copied) / device copy rate (each weight byte is read
once per token; activations are negligible).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from flashmoe.backends import get_backend
from flashmoe.bench.decode_run import summarise_pass
from flashmoe.runtime.engine import Engine
from flashmoe.runtime.eviction import DEFAULT_POLICY
from flashmoe.runtime.memory import parse_size
from flashmoe.runtime.placement import ExpertPlacement
from flashmoe.format.modeldir import ModelDir
from flashmoe.runtime.stats import Stats
from flashmoe.runtime.store import ExpertStore


def build_engine(model_dir: str | Path, backend: str, io: str = "pagecache", experts_per_token: int | None = None,
                 threads: int | None = None, gpu_memory: int = 0, gpu_policy: str = DEFAULT_POLICY,
                 preload: bool = False, expert_device: str = "gpu", guess_slots: int = 0,
                 guess_readers: int | None = None, read_parts: int | None = None,
                 cpu_activations: str | None = None) -> Engine:
    """An Engine on `backend` without the conformance gate (benchmarks and tests check conformance
    themselves); read buffers come from the backend's ``allocate_buffer`` (pinned memory
    for the CUDA backend). gpu_memory > 0 (cuda only): a VRAM expert cache of that many bytes (the engine
    then reads only the experts the GPU does not hold); with `preload`, every expert is read into it first when
    they all fit (Engine.preload_experts). expert_device: as load_engine's. guess_slots > 0: speculative reads
    of the next MoE layer's experts (ExpertStore.speculate), guess_readers of them at once (default: the
    store's). read_parts: the store's (default 1: whole reads; measured slower in parts, docs/benchmarks.md).
    cpu_activations: the activations of expert_device's CPU way (ExpertPlacement.of; default float)."""
    model = ModelDir.open(model_dir)
    be = get_backend(backend)
    placement = ExpertPlacement.of(expert_device, be, cpu_activations)
    k = experts_per_token or model.config.num_experts_per_tok
    stats = Stats(num_layers=len(model.moe_layers))
    threads = threads or max(4, k)
    store = ExpertStore({layer: model.expert_path(layer) for layer in model.moe_layers},
                        num_experts=model.config.num_experts, stride=model.layout.stride,
                        nbytes=model.layout.nbytes, mode=io, threads=threads, stats=stats,
                        read_parts=read_parts or 1, in_place=placement is not None,
                        allocate=be.allocate_buffer, guess_slots=guess_slots,
                        **({} if guess_readers is None else {"guess_readers": guess_readers}))
    if gpu_memory:
        be.configure_expert_cache(gpu_memory, gpu_policy)
    engine = Engine(model, be, store, stats, experts_per_token=k, placement=placement)
    if preload:
        engine.preload_experts(gpu_memory)
    return engine


def run_passes(engine: Engine, passes: list[str], prompt_tokens: int, tokens: int, seed: int) -> dict[str, dict]:
    """Evict the expert files from the page cache, then per pass: a fresh state, prefill a seeded prompt,
    greedy-decode `tokens` tokens. -> pass name -> summarise_pass figures."""
    engine.store.evict_page_cache()
    stats = engine.stats
    prompt = np.random.default_rng(seed).integers(0, engine.cfg.vocab_size, prompt_tokens)
    out = {}
    for name in passes:
        state = engine.new_state()
        first = len(stats.tokens)
        stats.start()
        logits = engine.forward(prompt, state)
        stats.token_done()
        before = dict(stats.stage_s)
        tier_before, launches = dict(engine.backend.expert_cache_stats), engine.backend.launches
        for _ in range(tokens):
            logits = engine.forward(np.array([int(np.argmax(logits[-1]))]), state)
            stats.token_done()
        stages = {s: v - before.get(s, 0.0) for s, v in stats.stage_s.items()}
        out[name] = summarise_pass(stats.tokens[first:], stages, len(engine.model_dir.moe_layers))
        if launches is not None:  # kernels and graphs the host launched per decode token
            out[name]["launches_per_token"] = (engine.backend.launches - launches) / tokens
        if tier_before:  # the GPU tier's hits, misses and host -> device bytes per decode token
            out[name]["gpu_tier_per_token"] = {k: (v - tier_before[k]) / tokens
                                               for k, v in engine.backend.expert_cache_stats.items()}
    return out


def _read_rate(store: ExpertStore, layers: list[int], n: int, k: int, seed: int) -> float:
    """Bytes/s of reading n experts (k at a time, as decode does) through the store."""
    rng = np.random.default_rng(seed)
    t0, total = time.perf_counter(), 0
    for i in range(0, n, k):
        layer = layers[(i // k) % len(layers)]
        f = store.fetch(layer, rng.choice(store.num_experts, k, replace=False).tolist())
        total += len(store.wait(f)) * store.nbytes
        store.release(f)
    return total / (time.perf_counter() - t0)


def _host_read_rate(nbytes: int = 1 << 30, repeats: int = 3) -> float:
    """Bytes/s of reading nbytes of host memory on every core (numba's threads; the best of `repeats`)."""
    import numba

    @numba.njit(parallel=True)
    def total(words):
        s = 0
        for i in numba.prange(words.size):
            s += words[i]
        return s

    words = np.ones(nbytes // 8, np.uint64)
    total(words[:1024])  # compiled outside the timing
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        total(words)
        best = min(best, time.perf_counter() - t0)
    return words.nbytes / best


def measure_rates(engine: Engine, experts: int = 80, repeats: int = 20, device_bytes: int = 1 << 30
                  ) -> dict[str, float]:
    """GB/s measured here: cold disk reads through the store, the same reads from the page cache, pinned
    host -> device copies of k experts, host memory read on every core, and device memory (a device-to-device
    copy of device_bytes, counting read + write)."""
    from numba import cuda

    store, k = engine.store, engine.k
    layers = list(engine.model_dir.moe_layers)
    store.evict_page_cache()
    disk = _read_rate(store, layers, experts, k, seed=123)
    host = _read_rate(store, layers, experts, k, seed=123)
    be = engine.backend
    pinned = be.allocate_buffer(k * store.nbytes)
    pinned[:] = 1
    dev = cuda.device_array(pinned.nbytes, np.uint8)
    dev.copy_to_device(pinned)
    cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dev.copy_to_device(pinned)
    cuda.synchronize()
    h2d = repeats * pinned.nbytes / (time.perf_counter() - t0)
    a = cuda.device_array(device_bytes, np.uint8)
    b = cuda.device_array(device_bytes, np.uint8)
    b.copy_to_device(a)
    cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        b.copy_to_device(a)
    cuda.synchronize()
    gpu = 5 * 2 * a.nbytes / (time.perf_counter() - t0)
    return {"disk_gb_s": disk / 1e9, "host_cache_gb_s": host / 1e9, "h2d_gb_s": h2d / 1e9,
            "cpu_gb_s": _host_read_rate() / 1e9, "gpu_gb_s": gpu / 1e9}


def resident_read_bytes(engine: Engine) -> int:
    """Resident bytes a decode token reads: all but the embedding table, of which it reads one row (unless
    the embedding is also the lm_head)."""
    model = engine.model_dir
    if model.config.tie_word_embeddings:
        return model.resident_nbytes
    embed = model.raw("embed_tokens.weight")
    return model.resident_nbytes - int(getattr(embed, "nbytes", 0))


def bound_ms(p: dict[str, Any], resident_bytes: int, expert_bytes: int, experts_per_token: int,
             rates: dict[str, float]) -> dict[str, float]:
    """Per-token floor of one pass from its bytes and the measured rates (ms); resident_bytes: those a
    token reads (:func:`resident_read_bytes`); expert_bytes: one expert's; experts_per_token: k times the
    MoE layers. Where the pass has the VRAM tier's counts (``gpu_tier_per_token``), the GPU computes its hits
    and misses, the misses' bytes are copied and the token's other experts ran on the CPU (read, or used
    where the page cache holds them: --expert-device cpu and auto); without a tier every expert read is
    copied and computed there. (The bytes read from the store alone would leave out of the GPU's bytes every
    expert the tier holds, all of them with --preload, and out of the CPU's those used in place.)"""
    disk, total = p["disk_bytes_per_token"], p["bytes_read_per_token"]
    tier = p.get("gpu_tier_per_token")
    copied = tier["bytes_copied"] if tier else total
    on_gpu = (tier["gpu_hits"] + tier["gpu_misses"]) * expert_bytes if tier else total
    on_cpu = experts_per_token * expert_bytes - on_gpu if tier else 0.0
    read = disk / rates["disk_gb_s"] / 1e6 + max(total - disk, 0) / rates["host_cache_gb_s"] / 1e6
    h2d = copied / rates["h2d_gb_s"] / 1e6
    cpu = max(on_cpu, 0) / rates["cpu_gb_s"] / 1e6 if "cpu_gb_s" in rates else 0.0
    gpu = (resident_bytes + on_gpu) / rates["gpu_gb_s"] / 1e6
    return {"read_ms": read, "h2d_ms": h2d, "cpu_ms": cpu, "gpu_ms": gpu, "bound_ms": max(read, h2d, cpu, gpu)}


def gpu_ms_per_token(engine: Engine, tokens: int = 4, seed: int = 0, spin_ms: int = 500) -> list[float]:
    """The GPU's time for each of `tokens` warm decode tokens with the host's launch time hidden: before each
    token the GPU is held by a kernel that sleeps `spin_ms`, so the token's kernels queue up behind it and then
    run back to back; the time from an event after the sleep to one after the token's logits reached the
    host. Valid only while a decode step does not wait for the GPU before its end (every expert in VRAM
    with device routing: ``--preload``); otherwise it counts the host's time after the first wait too."""
    from numba import cuda

    @cuda.jit
    def sleep(ms):
        for _ in range(ms):
            cuda.nanosleep(1_000_000)

    state, logits = _warm_state(engine, seed)
    out = []
    for _ in range(tokens):
        start, end = cuda.event(), cuda.event()
        sleep[1, 1](spin_ms)
        start.record()
        logits = engine.forward(np.array([int(np.argmax(logits[-1]))]), state)
        end.record()
        end.synchronize()
        out.append(cuda.event_elapsed_time(start, end))
    return out


def _warm_state(engine: Engine, seed: int) -> tuple[Any, np.ndarray]:
    """A new state after a seeded 4-token prompt and two decode tokens (the first decode step runs eagerly,
    the second is recorded where the backend records decode steps): (state, last logits)."""
    state = engine.new_state()
    logits = engine.forward(np.random.default_rng(seed).integers(0, engine.cfg.vocab_size, 4), state)
    for _ in range(2):
        logits = engine.forward(np.array([int(np.argmax(logits[-1]))]), state)
    return state, logits


def kernel_table(engine: Engine, tokens: int, seed: int, rows: int = 18) -> str:
    """GPU time by kernel over `tokens` warm decode tokens, as a markdown table (torch.profiler's CUDA
    activity: it sees numba's launches and replayed graphs alike, on the device's one primary context)."""
    from torch.profiler import ProfilerActivity, profile

    state, logits = _warm_state(engine, seed)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(tokens):
            logits = engine.forward(np.array([int(np.argmax(logits[-1]))]), state)
    by_name: dict[str, list[float]] = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if us > 0:
            total = by_name.setdefault(_kernel_name(e.key), [0.0, 0])
            total[0] += us
            total[1] += e.count
    lines = ["| kernel | GPU ms/token | launches/token | us/launch |", "|---|---|---|---|"]
    for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"| {name} | {us / 1e3 / tokens:.3f} | {n / tokens:.0f} | {us / max(n, 1):.1f} |")
    return "\n".join(lines)


def _kernel_name(name: str) -> str:
    """A numba kernel's dotted name after the package, 'cuda_kernels.qlinear', from the name the profiler
    reports: numba's Itanium-mangled one (_ZN6cudapy8flashmoe8backends12cuda_kernels7qlinear12_3clocals_3e6kernel
    B2v1B57cw51c...E5ArrayIjLi1E...: length-prefixed names, then abi tags and argument types) or its demangled
    form (cudapy::flashmoe::backends::cuda_kernels::qlinear::_3clocals_3e::kernel[abi:v1]...(Array<...>, ...)),
    with or without the cudapy:: namespace; numba's `<locals>` and a factory's inner `kernel` are dropped. Any other name (copies, other libraries'
    kernels) whole."""
    if name.startswith("_ZN"):
        parts, i = [], 3
        while i < len(name) and name[i].isdigit():
            j = i
            while j < len(name) and name[j].isdigit():
                j += 1
            parts.append(name[j:j + int(name[i:j])])
            i = j + int(name[i:j])
    else:  # demangled: the qualified name ends at the abi tags or the arguments
        parts = re.split(r"[\[(<]", name, maxsplit=1)[0].split("::")
    if parts[:1] == ["cudapy"]:  # numba's namespace; the profiler's demangled names on an H100 (numba-cuda
        parts = parts[1:]         # 0.30.4, 2026-12-07) began at flashmoe:: without it
    elif parts[:1] != ["flashmoe"]:
        parts = []
    keep = [p for p in parts if p not in ("_3clocals_3e", "kernel")]
    if keep[:1] == ["flashmoe"] and len(keep) > 2:  # flashmoe.backends.cuda_kernels.qlinear: the package goes
        keep = keep[2:]
    return ".".join(keep) or name


def _profile(engine: Engine, tokens: int, seed: int) -> None:
    import cProfile
    import pstats

    state, logits = _warm_state(engine, seed)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(tokens):
        logits = engine.forward(np.array([int(np.argmax(logits[-1]))]), state)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(22)


def _print_table(result: dict[str, Any]) -> None:
    """The passes of every run as a markdown table, then the first run's measured rates."""
    print("| backend | gpu memory | experts not in VRAM on | pass | tok/s | ms/token | median ms/token | ms/layer | compute ms/layer "
          "| io wait ms/layer | GPU hits/token | host launches/token | bound ms/token |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in result["runs"]:
        for label, p in run["passes"].items():
            bound = f"{p['bound']['bound_ms']:.2f}" if "bound" in p else ""
            tier = p.get("gpu_tier_per_token", {})
            hits = f"{tier['gpu_hits']:.1f}" if "gpu_hits" in tier else ""
            launches = f"{p['launches_per_token']:.0f}" if "launches_per_token" in p else ""
            print(f"| {run['backend']} | {run['gpu_memory']} | {run.get('expert_device', 'gpu')} | {label} | {p['tok_s']:.2f} | {p['ms_per_token']:.1f} "
                  f"| {np.median(p['decode_token_ms']):.2f} | {p['ms_per_layer']:.2f} | {p['compute_ms_per_layer']:.2f} | {p['io_wait_ms_per_layer']:.2f} "
                  f"| {hits} | {launches} | {bound} |")
    if "rates" in result["runs"][0]:
        print(json.dumps(result["runs"][0]["rates"]))



def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="model directory (written first with --synth-like)")
    ap.add_argument("--synth-like", default=None, help="first write a synthetic model of this preset's shapes "
                    "(flashmoe synth's presets; no tokenizer) at --model")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the --synth-like model")
    ap.add_argument("--device-bytes", type=int, default=1 << 30, help="size of the device-copy measurement")
    ap.add_argument("--backends", default="cuda,numba")
    ap.add_argument("--gpu-memory", default="0", help="comma-separated VRAM expert cache sizes ('16G'); the "
                    "cuda backend runs once per size (0: no cache)")
    ap.add_argument("--preload", action="store_true", help="read every expert into the VRAM cache first when "
                    "they all fit (decode then routes on the GPU)")
    ap.add_argument("--gpu-policy", default=DEFAULT_POLICY, help="eviction policy of the VRAM expert cache")
    ap.add_argument("--expert-device", default="gpu", help="comma-separated: where decode experts not in the VRAM "
                    "cache run (gpu, cpu, auto; flashmoe.runtime.placement); the cuda backend runs once per value")
    ap.add_argument("--cpu-activations", default=None, help="activations of --expert-device's CPU way (float, "
                    "the default, or q8)")
    ap.add_argument("--guess-slots", type=int, default=0, help="speculative reads of the next MoE layer's "
                    "experts, this many a layer (0: off; the engine's --speculate reads k)")
    ap.add_argument("--guess-readers", type=int, default=None, help="speculative reads at once (default: the "
                    "store's GUESS_READERS)")
    ap.add_argument("--read-parts", type=int, default=None, help="each expert read in this many parts on as many "
                    "threads (default 1: whole reads; ExpertStore read_parts)")
    ap.add_argument("-k", "--experts-per-token", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--cpu-tokens", type=int, default=3, help="decode tokens for backends other than cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", type=int, default=0, help="then profile this many more warm decode tokens of "
                    "the first backend with cProfile and print the top functions by own time")
    ap.add_argument("--gpu-time", type=int, default=0, help="then time this many warm decode tokens on the GPU "
                    "alone, queued behind a sleeping kernel (gpu_ms_per_token)")
    ap.add_argument("--kernels", type=int, default=0, help="then time this many warm decode tokens by kernel "
                    "(needs torch: kernel_table)")
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    result: dict[str, Any] = {"model": str(a.model), "runs": []}
    if a.synth_like:
        from flashmoe.arch.presets import get_preset
        from flashmoe.convert.synth import synth_model

        t0 = time.perf_counter()
        synth_model(a.model, get_preset(a.synth_like).config_dict(a.layers), tokenizer=None, force=True)
        result["synth"] = {"like": a.synth_like, "layers": a.layers, "seconds": time.perf_counter() - t0}
    configs = [(name, size, where) for name in a.backends.split(",")
               for size in (a.gpu_memory.split(",") if name == "cuda" else ["0"])
               for where in (a.expert_device.split(",") if name == "cuda" else ["gpu"])]
    for name, size, where in configs:
        t0 = time.perf_counter()
        engine = build_engine(a.model, name, experts_per_token=a.experts_per_token, gpu_memory=parse_size(size),
                              gpu_policy=a.gpu_policy, preload=a.preload, expert_device=where,
                              guess_slots=a.guess_slots, guess_readers=a.guess_readers, read_parts=a.read_parts,
                              cpu_activations=a.cpu_activations)
        load_s = time.perf_counter() - t0
        run: dict[str, Any] = {"backend": name, "gpu_memory": size, "expert_device": where, "k": engine.k,
                               "guess_slots": a.guess_slots, "guess_readers": a.guess_readers,
                               "read_parts": engine.store.read_parts,
                               "moe_layers": len(engine.model_dir.moe_layers),
                               "resident_bytes": engine.model_dir.resident_nbytes,
                               "resident_read_bytes": resident_read_bytes(engine), "expert_bytes": engine.store.nbytes,
                               "load_s": load_s}
        if hasattr(engine.backend, "device_description"):
            run["device"] = engine.backend.device_description()
        if name == "cuda":
            run["rates"] = measure_rates(engine, device_bytes=a.device_bytes)
        tokens = a.tokens if name == "cuda" else a.cpu_tokens
        run["passes"] = run_passes(engine, ["cold", "warm"], a.prompt_tokens, tokens, a.seed)
        if name == "cuda":
            for p in run["passes"].values():
                p["bound"] = bound_ms(p, run["resident_read_bytes"], run["expert_bytes"],
                                      engine.k * run["moe_layers"], run["rates"])
        a.json.write_text(json.dumps({**result, "runs": result["runs"] + [run]}, indent=1) + "\n")
        if name == "cuda" and a.gpu_time:
            run["gpu_ms_per_token"] = gpu_ms_per_token(engine, a.gpu_time, a.seed)
            print(f"GPU ms/token, host launch time hidden: {[round(t, 2) for t in run['gpu_ms_per_token']]}")
        if name == "cuda" and a.kernels:
            run["kernels"] = kernel_table(engine, a.kernels, a.seed)
            print(run["kernels"])
        if a.profile and not result["runs"]:
            _profile(engine, a.profile, a.seed)
        run["not_recorded"] = engine.not_recorded
        if engine.placement is not None:
            run["placement"] = {"cpu_activations": engine.placement.cpu.activations,
                                "tokens_on_cpu": engine.placement.tokens[True],
                                "tokens_on_gpu": engine.placement.tokens[False],
                                "seconds_per_gb": {("cpu" if k else "gpu"): v * 1e9
                                                   for k, v in engine.placement.seconds_per_byte.items()}}
            print(f"{name} {size} {where}: {run['placement']}")
        print(f"{name} {size}: decode steps {'replayed' if engine.not_recorded is None else 'eager'}"
              f"{'' if engine.not_recorded is None else ': ' + engine.not_recorded}")
        engine.store.close()
        result["runs"].append(run)
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    _print_table(result)

if __name__ == "__main__":
    main()
