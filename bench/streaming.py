"""`flashmoe bench`: streaming decode against the disk-bound ceiling, measured in one run.

For a model directory (typically from `flashmoe synth`), in this order:

1. Disk: the bandwidth of the model's own first expert file for the store's read pattern — one read per
   expert, k reads in flight, the file dropped from the page cache before every pass
   (bench/bench_disk.measure_store) — in each store mode and for each k.
2. Reference: `pagecache` mode without a memory cap, a cold pass then a warm pass over the same tokens.
   The warm pass has every expert it needs in memory: its time per token is the compute time of the bound.
3. Decode: every combination of --modes, --k, --threads (compute threads, NUMBA_NUM_THREADS) and
   --budgets (`--max-memory`), each in its own process (bench/decode_run.py) so that peak RSS is its own;
   with --cgroup the process runs in a memory cgroup limited to the budget, which also charges the page
   cache, so `pagecache` mode is capped for real.
4. Ceiling, per pass (add_ceiling): disk time = expert bytes from disk per token ÷ the disk's bandwidth
   (same mode, same k); bound = max(disk time, compute time); reported as disk-bound tok/s and time ÷ bound.
5. Peer (`--peer llama.cpp`, bench/llama_cpp.py): llama.cpp on the same weights exported to GGUF
   (bench/gguf_export.py, Q4_0; written beside the model directory on first use), the same prompt and
   decode token ids, the same k and compute threads: beside the uncapped reference run when no --budgets
   are given (the model fits in memory: llama.cpp's defaults hold all of it in anonymous memory), else once
   per budget in the same cgroup memory cap (there with its weights left in the mmap'd file: llama.cpp's
   default repacking copies the whole model into memory); `side_by_side` pairs each flashmoe pass with llama.cpp's
   (tok/s and their ratio). llama.cpp follows its own router, so the peer needs `--routing model`.
6. Replays (flashmoe/runtime/replay.py): the routing trace recorded during the first pass of the first budgeted run
   (the reference's when there is none; random weights: near-uniform routing) and every --replay TRACE,
   through each eviction policy.

Writes `bench.json`, `bench.md` and figures (bench/report.py) into --out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from flashmoe.bench.bench_disk import block_device_info, filesystem_of, machine_info, measure_store
from flashmoe.bench.decode_run import decode_inputs
from flashmoe.runtime.replay import DEFAULT_FRACTIONS, replay
from flashmoe.bench.report import figures, markdown, run_label
from flashmoe.errors import FlashMoeError
from flashmoe.runtime.eviction import DEFAULT_POLICY, POLICIES
from flashmoe.runtime.memory import parse_size
from flashmoe.format.modeldir import ModelDir
from flashmoe.runtime.store import MODES

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
PASSES = ("cold", "warm")
ROUTINGS = ("model", "uniform")
PEERS = ("llama.cpp",)


@dataclass
class BenchOptions:
    """What `flashmoe bench` measures (see the command's help for each)."""

    model_dir: Path | None
    out: Path
    backend: str = "numba"
    activations: str | None = None  # None: the backend's default (flashmoe.reference.q8)
    modes: tuple[str, ...] = ("pagecache", "direct")
    ks: tuple[int | None, ...] = (None,)
    threads: tuple[int, ...] = (os.cpu_count() or 1,)
    budgets: tuple[str, ...] = ()
    io_threads: int | None = None
    prompt_tokens: int = 8
    tokens: int = 16
    passes: tuple[str, ...] = ("cold", "warm")
    reference_tokens: int | None = None  # decode tokens of the reference run (default: tokens)
    disk_experts: int = 64
    disk_repeats: int = 3
    cgroup: bool = False
    cache_policy: str = DEFAULT_POLICY
    replays: tuple[Path, ...] = ()
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    figures: bool = True
    seed: int = 0
    routing: str = "model"  # or "uniform": seeded uniform random router picks (bench/decode_run.py)
    speculate: tuple[bool, ...] = (False,)  # budgeted runs without and/or with speculative reads
    peer: str | None = None  # "llama.cpp": run it beside flashmoe (bench/llama_cpp.py)
    peer_gguf: Path | None = None  # its GGUF (default: MODEL_DIR.q4_0.gguf beside the model, exported if absent)
    log: object = field(default=print, repr=False)

    def check(self) -> None:
        """Check every option before any work (run_bench's first step). Raises FlashMoeError naming the
        command-line option (`--tokens`, `--modes`, ...) and the offending value."""
        from flashmoe.backends import get_backend

        def one_of(option: str, values: tuple, allowed: tuple) -> None:
            if not values:
                raise FlashMoeError(f"{option}: nothing given; choose from {', '.join(allowed)}")
            for v in values:
                if v not in allowed:
                    raise FlashMoeError(f"{option}: {v!r} is not one of {', '.join(allowed)}")
            if len(set(values)) < len(values):
                raise FlashMoeError(f"{option}: {','.join(values)} names a value twice")

        def positive(option: str, *values: int | None) -> None:
            for v in values:
                if v is not None and v < 1:
                    raise FlashMoeError(f"{option}: {v} is not a positive number")

        if self.out.exists() and not self.out.is_dir():
            raise FlashMoeError(f"--out {self.out}: exists and is not a directory")
        one_of("--modes", self.modes, MODES)
        one_of("--passes", self.passes, PASSES)
        one_of("--routing", (self.routing,), ROUTINGS)
        one_of("--cache-policy", (self.cache_policy.lower(),), tuple(POLICIES))
        if self.peer is not None:
            one_of("--peer", (self.peer,), PEERS)
            if self.model_dir is None:
                raise FlashMoeError(f"--peer {self.peer}: needs a model directory to run beside")
            if self.routing != "model":
                raise FlashMoeError(f"--peer {self.peer} needs --routing model: llama.cpp follows its own router")
        positive("-k/--experts-per-token", *self.ks)
        positive("--threads", *self.threads)
        for threads in self.threads:
            if threads > (os.cpu_count() or 1):  # as generate's --threads: numba's pool would have idle threads
                raise FlashMoeError(f"--threads: {threads} is more than this machine's {os.cpu_count()} cores")
        positive("--io-threads", self.io_threads)
        positive("--prompt-tokens", self.prompt_tokens)
        positive("--tokens", self.tokens)
        positive("--reference-tokens", self.reference_tokens)
        positive("--disk-repeats", self.disk_repeats)
        positive("disk_experts", self.disk_experts)
        for budget in self.budgets:
            try:
                parse_size(budget)
            except FlashMoeError as e:
                raise FlashMoeError(f"--budgets: {e}") from None
        if not self.speculate:
            raise FlashMoeError("--speculate: nothing given; 'off', 'on' or 'off,on'")
        if self.cgroup and not self.budgets:
            raise FlashMoeError("--cgroup: caps each budgeted run, but no --budgets are given")
        if self.cgroup and not CGROUP_ROOT.is_dir():
            raise FlashMoeError(f"--cgroup: needs cgroup v1's memory controller at {CGROUP_ROOT} (and root)")
        for trace in self.replays:
            if not Path(trace).is_file():
                raise FlashMoeError(f"--replay {trace}: no such file")
        if self.model_dir is not None:
            try:
                get_backend(self.backend)
            except FlashMoeError as e:
                raise FlashMoeError(f"--backend: {e}") from None


def describe_model(md: ModelDir) -> str:
    """'qwen3_5_moe_text, 4 of 60 layers, 512 experts, ...' from the manifest's synthetic source."""
    cfg, src = md.config, md.manifest.source
    name = src.get("like") or src.get("config") or src.get("checkpoint") or md.path.name
    layers = f"{cfg.num_hidden_layers} layers"
    if "truncated_to_layers" in src:
        layers += " (truncated)"
    kind = "random weights" if src.get("synthetic") else "converted"
    return (f"{name} ({kind}), {layers}, {cfg.num_experts} experts, config k={cfg.num_experts_per_tok}, "
            f"{md.layout.nbytes / 1e6:.2f} MB per expert")


def recorded_trace_kind(md: ModelDir, routing: str) -> str:
    """What the routing trace recorded during the bench's decode runs shows, for the replay table: its
    inputs are seeded random token ids; routing 'uniform' forces the picks."""
    if routing == "uniform":
        return "forced uniform routing (worst case for a cache)"
    if md.manifest.source.get("synthetic"):
        return "routing of the random-weight model"
    return f"recorded routing of {md.path.name} (random token ids)"


def _cgroup(name: str, limit: int) -> Path:
    path = CGROUP_ROOT / name
    path.mkdir(exist_ok=True)
    (path / "memory.limit_in_bytes").write_text(str(limit))
    return path


@contextmanager
def memory_cap(opts: BenchOptions, budget: str | None) -> Iterator[tuple[Callable[[], None] | None, dict]]:
    """(preexec_fn, info) for one child process: with --cgroup and a budget, the preexec_fn moves the child
    (between fork and exec) into a fresh cgroup-v1 memory group limited to the budget, which charges its page
    cache too; the group is removed afterwards and info['cgroup_max_usage_bytes'] holds its peak usage.
    Without them: (None, {})."""
    info: dict = {}
    if not (opts.cgroup and budget is not None):
        yield None, info
        return
    group = _cgroup(f"flashmoe-bench-{os.getpid()}", parse_size(budget))
    procs = group / "cgroup.procs"

    def enter_cgroup() -> None:
        procs.write_text(str(os.getpid()))

    try:
        yield enter_cgroup, info
    finally:
        info["cgroup_max_usage_bytes"] = int((group / "memory.max_usage_in_bytes").read_text())
        group.rmdir()


def run_child(opts: BenchOptions, io: str, k: int | None, threads: int, budget: str | None, out_json: Path,
              passes: tuple[str, ...], tokens: int, trace: Path | None = None, speculate: bool = False) -> dict:
    """One decode_run process; its result dict. Raises FlashMoeError with the child's last output lines
    when it fails (a MemoryBudgetError of a too-small budget included)."""
    cmd = [sys.executable, "-m", "flashmoe.bench.decode_run", "--model", str(opts.model_dir), "--backend",
           opts.backend, "--io", io, "--prompt-tokens", str(opts.prompt_tokens), "--tokens", str(tokens),
           "--seed", str(opts.seed), "--cache-policy", opts.cache_policy, "--passes", ",".join(passes),
           "--routing", opts.routing,
           "--json", str(out_json)] + (["--speculate"] if speculate else [])
    for flag, value in (("--max-memory", budget), ("-k", k), ("--io-threads", opts.io_threads), ("--trace", trace),
                        ("--activations", opts.activations)):
        if value is not None:
            cmd += [flag, str(value)]
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    with memory_cap(opts, budget) as (preexec, cap):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=preexec)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
        raise FlashMoeError(f"decode run {io} k={k} threads={threads} budget={budget} failed "
                            f"(exit {proc.returncode}):\n{tail}")
    result = json.loads(out_json.read_text())
    result["wall_s"] = time.perf_counter() - t0
    result["max_memory_bytes"] = parse_size(budget) if budget else None
    result["cgroup_limit_bytes"] = parse_size(budget) if preexec is not None else None
    result.update(cap)
    return result


def run_peer(opts: BenchOptions, runner: Path, gguf: Path, md: ModelDir, k: int, threads: int, budget: str | None,
             passes: tuple[str, ...], tokens: int) -> dict:
    """llama.cpp (bench/llama_cpp.run_llama) on the GGUF export of the model: decode_run's prompt and decode
    ids for this seed, k and threads, in the same memory cap as run_child; its result dict with the budget.
    Without a budget llama.cpp runs with its defaults (weights repacked into memory: its fastest); with one,
    with --no-repack (weights left in the mmap'd file), since repacking needs memory for the whole model."""
    from flashmoe.bench.gguf_export import llama_arch
    from flashmoe.bench.llama_cpp import run_llama

    prompt, decode = decode_inputs(md.config.vocab_size, opts.prompt_tokens, tokens, opts.seed)
    override = None if k == md.config.num_experts_per_tok else f"{llama_arch(md.config)}.expert_used_count={k}"
    with memory_cap(opts, budget) as (preexec, cap):
        run = run_llama(runner, gguf, threads, prompt, decode, passes, override=override, repack=budget is None,
                        preexec=preexec)
    run.update(cap, k=k, compute_threads=threads, max_memory=budget,
               max_memory_bytes=parse_size(budget) if budget else None,
               cgroup_limit_bytes=parse_size(budget) if preexec is not None else None)
    return run


def side_by_side(flashmoe_run: dict, peer_run: dict) -> list[dict]:
    """One row per pass both runs have: flashmoe's and llama.cpp's decode tok/s and their ratio (flashmoe ÷
    llama.cpp), and the same for the prompt (prefill): prompt tokens ÷ the prefill's time (`ttft_s`: the
    prompt's forward pass up to the logits of its last position, in both engines)."""
    rows = []
    n = flashmoe_run["prompt_tokens"]
    for name, p in flashmoe_run["passes"].items():
        q = peer_run["passes"].get(name)
        if q is None or not q["tok_s"]:
            continue
        prompt, peer_prompt = n / p["ttft_s"], n / q["ttft_s"]
        rows.append({"flashmoe": run_label(flashmoe_run), "pass": name, "k": flashmoe_run["k"],
                     "threads": flashmoe_run["compute_threads"], "max_memory": flashmoe_run["max_memory"],
                     "cgroup": flashmoe_run.get("cgroup_limit_bytes") is not None,
                     "flashmoe_tok_s": p["tok_s"], "llama_cpp_tok_s": q["tok_s"], "ratio": p["tok_s"] / q["tok_s"],
                     "prompt_tokens": n, "flashmoe_prompt_tok_s": prompt, "llama_cpp_prompt_tok_s": peer_prompt,
                     "prompt_ratio": prompt / peer_prompt})
    return rows


def _peer_setup(opts: BenchOptions, md: ModelDir) -> tuple[Path, Path]:
    """(llama.cpp runner, GGUF path): built or found, exported if absent (the peer and routing were checked by
    BenchOptions.check)."""
    from flashmoe.bench.gguf_export import export_gguf
    from flashmoe.bench.llama_cpp import find_or_build

    runner = find_or_build(log=opts.log)
    gguf = opts.peer_gguf or md.path.with_name(md.path.name + ".q4_0.gguf")
    if not gguf.exists():
        opts.log(f"peer: exporting {md.path} to {gguf} (Q4_0)")
        export_gguf(md.path, gguf)
    return runner, gguf


def add_ceiling(run: dict, disk_gb_s: dict[tuple[str, int], float], reference_ms: float | None) -> None:
    """Attach to each pass of `run` its ceiling figures:

    - disk time per token: bytes from disk that the token used ÷ the disk's bandwidth for this mode and k
      (wrong guesses of speculative reads are excluded: they are a cost of the method, not of the token);
    - `bound_ms` = max(disk time, this pass's own compute time): compute measured in the same pass (stage
      times, I/O wait excluded) is immune to the load changing between runs on a shared machine; the ratio
      time ÷ bound is then 1 only when I/O is fully hidden behind compute or compute behind I/O;
    - `reference_bound_ms` = max(disk time, the reference's warm time per token), the issue's definition
      (every expert in memory), measured minutes apart from this pass.
    """
    bw = disk_gb_s.get((run["io"], run["k"]))
    for p in run["passes"].values():
        if bw is None:
            continue
        disk_ms = 1e3 * (p["disk_bytes_per_token"] - p.get("guess_wasted_bytes_per_token", 0)) / (bw * 1e9)
        bound = max(disk_ms, p["compute_ms_per_token"])
        reference_bound = max(disk_ms, reference_ms or 0.0)
        p["ceiling"] = {
            "disk_gb_s": bw,
            "disk_ms_per_token": disk_ms,
            "disk_ms_per_layer": disk_ms / run["moe_layers"],
            "disk_bound_tok_s": 1e3 / disk_ms if disk_ms > 0 else None,
            "tok_s_over_disk_bound": (p["tok_s"] * disk_ms / 1e3) if disk_ms > 0 else None,
            "bound_ms": bound,
            "time_over_bound": p["ms_per_token"] / bound if bound > 0 else None,
            "reference_compute_ms_per_token": reference_ms,
            "reference_bound_ms": reference_bound,
            "time_over_reference_bound": p["ms_per_token"] / reference_bound if reference_bound > 0 else None,
        }


def run_bench(opts: BenchOptions) -> dict:
    """Everything the module docstring lists; returns the result dict (also written to opts.out).
    Raises FlashMoeError for an invalid option (BenchOptions.check) before anything runs."""
    opts.check()
    if opts.model_dir is None and not opts.replays:
        raise FlashMoeError("nothing to measure: give a model directory and/or --replay TRACE")
    md = _open_model(opts) if opts.model_dir is not None else None
    opts.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_info(),
                    "options": {k: v for k, v in vars(opts).items() if k != "log"}, "runs": [], "replays": []}
    traces: list[tuple[Path, str | None]] = [(Path(t), None) for t in opts.replays]
    if md is not None:
        ks = [md.config.num_experts_per_tok if k is None else k for k in opts.ks]
        result["model"] = _model_facts(opts, md)
        disk_gb_s = _measure_disk(opts, md, ks, result)
        recorded_trace = _decode_runs(opts, md, ks, disk_gb_s, result)
        if recorded_trace.exists():
            traces.insert(0, (recorded_trace, recorded_trace_kind(md, opts.routing)))
    for path, kind in traces:
        opts.log(f"replay: {path}")
        r = replay(path, opts.fractions)
        r["kind"] = kind or f"recorded routing of {Path(r['model']).name or 'an unnamed model'}"
        result["replays"].append(r)
    (opts.out / "bench.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (opts.out / "bench.md").write_text(markdown(result))
    if opts.figures:
        result["figures"] = [str(p) for p in figures(result, opts.out)]
        (opts.out / "bench.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


def _open_model(opts: BenchOptions) -> ModelDir:
    """The model directory, opened and checked against the -k values asked for (FlashMoeError if not)."""
    md = ModelDir.open(opts.model_dir)
    for k in opts.ks:
        if k is not None and k > md.config.num_experts:
            raise FlashMoeError(f"-k/--experts-per-token: {k} is more than the model's "
                                f"{md.config.num_experts} experts")
    return md


def _model_facts(opts: BenchOptions, md: ModelDir) -> dict:
    """The result's "model" entry: what was measured, with the sizes the ceilings use."""
    cfg, layout = md.config, md.layout
    return {"dir": str(opts.model_dir), "description": describe_model(md), "source": md.manifest.source,
            "moe_layers": len(md.moe_layers), "num_hidden_layers": cfg.num_hidden_layers,
            "num_experts": cfg.num_experts, "expert_bytes": layout.nbytes, "expert_stride": layout.stride,
            "expert_file_bytes": len(md.moe_layers) * cfg.num_experts * layout.stride,
            "resident_bytes": md.resident_nbytes}


def _measure_disk(opts: BenchOptions, md: ModelDir, ks: list[int], result: dict) -> dict[tuple[str, int], float]:
    """Cold reads of the first expert file through the store, per mode and k in flight, into result["disk"];
    returns GB/s per (mode, k) for the ceilings."""
    cfg, layout = md.config, md.layout
    first = md.expert_path(md.moe_layers[0])
    fs = filesystem_of(first)
    result["disk"] = {"file": str(first), "filesystem": fs, "device": block_device_info(fs["device"]),
                      "store": []}
    disk_gb_s: dict[tuple[str, int], float] = {}
    for mode in opts.modes:
        for k in sorted(set(ks)):
            opts.log(f"disk: {mode}, {k} reads in flight, {opts.disk_repeats} cold passes over "
                     f"{min(opts.disk_experts, cfg.num_experts)} experts of {first.name}")
            d = measure_store(first, min(opts.disk_experts, cfg.num_experts), layout.stride, layout.nbytes,
                              mode, k, cold=True, repeats=opts.disk_repeats)
            result["disk"]["store"].append(d)
            disk_gb_s[(mode, k)] = d["gb_s"]
    result["disk_gb_s"] = {f"{m} k={k}": v for (m, k), v in disk_gb_s.items()}
    return disk_gb_s


def _decode_runs(opts: BenchOptions, md: ModelDir, ks: list[int], disk_gb_s: dict[tuple[str, int], float],
                 result: dict) -> Path:
    """Per k and thread count: the uncapped reference run, then every mode x budget x speculation, each
    with its ceilings, and llama.cpp beside them with --peer; appended to result. Returns the path where
    the first budgeted run (or the reference, without budgets) recorded its routing trace."""
    log = opts.log
    if not opts.budgets:
        log("no --budgets: only the uncapped pagecache reference runs (give e.g. --budgets 4G to decode in "
            f"{', '.join(opts.modes)} mode under a memory budget)")
    recorded_trace = opts.out / "routing-trace.jsonl"
    peer = None
    if opts.peer:
        runner, gguf = peer = _peer_setup(opts, md)
        result.update(peer={"engine": opts.peer, "runner": str(runner), "gguf": str(gguf),
                            "gguf_bytes": gguf.stat().st_size}, peer_runs=[], side_by_side=[])
    for k in ks:
        for t in opts.threads:
            log(f"reference: pagecache, no cap, k={k}, {t} compute threads (cold, then warm = all in memory)")
            trace_here = not recorded_trace.exists() and not opts.budgets
            ref = run_child(opts, "pagecache", k, t, None, opts.out / f"run-ref-k{k}-t{t}.json",
                            ("cold", "warm"), opts.reference_tokens or opts.tokens,
                            trace=recorded_trace if trace_here else None)
            ref["reference"] = True
            compute_ms = ref["passes"]["warm"]["ms_per_token"]
            add_ceiling(ref, disk_gb_s, compute_ms)
            result["runs"].append(ref)
            _log_run(log, ref)
            if peer and not opts.budgets:
                _peer_beside(opts, peer, md, result, [ref], None, ("cold", "warm"),
                             opts.reference_tokens or opts.tokens)
            for mode in opts.modes:
                for budget in opts.budgets:
                    for spec in opts.speculate:
                        log(f"decode: {mode}, k={k}, {t} threads, --max-memory {budget}"
                            + (", speculative reads" if spec else ""))
                        name = f"run-{mode}-k{k}-t{t}-{budget}" + ("-speculate" if spec else "")
                        run = run_child(opts, mode, k, t, budget, opts.out / f"{name}.json", opts.passes,
                                        opts.tokens, trace=None if recorded_trace.exists() else recorded_trace,
                                        speculate=spec)
                        add_ceiling(run, disk_gb_s, compute_ms)
                        result["runs"].append(run)
                        _log_run(log, run)
            for budget in opts.budgets if peer else ():
                _peer_beside(opts, peer, md, result, [r for r in result["runs"] if r["max_memory"] == budget
                             and r["k"] == k and r["compute_threads"] == t], budget, opts.passes, opts.tokens)
    return recorded_trace


def _peer_beside(opts: BenchOptions, peer: tuple[Path, Path], md: ModelDir, result: dict, runs: list[dict],
                 budget: str | None, passes: tuple[str, ...], tokens: int) -> None:
    """llama.cpp (peer = its runner and the GGUF file) under the same k, threads and budget as `runs`,
    and each run side by side with it, appended to result."""
    k, t = runs[0]["k"], runs[0]["compute_threads"]
    opts.log(f"peer: llama.cpp, k={k}, {t} threads, " + (f"cap {budget}" if budget else "no cap"))
    runner, gguf = peer
    peer_run = run_peer(opts, runner, gguf, md, k, t, budget, passes, tokens)
    result["peer_runs"].append(peer_run)
    for run in runs:
        result["side_by_side"] += side_by_side(run, peer_run)
    for name, p in peer_run["passes"].items():
        opts.log(f"  {name}: {p['tok_s']:.3f} tok/s, prompt {peer_run['prompt_tokens'] / p['ttft_s']:.2f} tok/s, peak RSS {peer_run['peak_rss_bytes'] / 2**30:.2f} GiB, "
                 f"{peer_run['disk_read_bytes'] / 1e9:.2f} GB read from disk in the run")


def _log_run(log, run: dict) -> None:
    for name, p in run["passes"].items():
        hit = "n/a" if p["hit_rate"] is None else f"{p['hit_rate']:.1%}"
        over = p.get("ceiling", {}).get("time_over_bound")
        log(f"  {name}: {p['tok_s']:.3f} tok/s, prompt {run['prompt_tokens'] / p['ttft_s']:.2f} tok/s, "
            f"{p['ms_per_layer']:.1f} ms/layer "
            f"({p['compute_ms_per_layer']:.1f} compute, {p['io_wait_ms_per_layer']:.1f} I/O wait), "
            f"{p['disk_bytes_per_token'] / 1e9:.3f} GB/token from disk, hit rate {hit}, peak RSS "
            f"{run['peak_rss_bytes'] / 2**30:.2f} GiB, time/bound {'n/a' if over is None else f'{over:.2f}'}")
