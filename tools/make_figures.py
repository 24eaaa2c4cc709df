"""Regenerate docs/how-it-works.md and its figures from a recorded run of the bundled demo model.

    python tools/make_figures.py            # record a run, then render (both steps)
    python tools/make_figures.py record     # run the model: docs/figures/trace.jsonl and docs/figures/run.json
    python tools/make_figures.py render     # figures and document from those two files (and the model's config)

record: greedy decoding of a prompt on the demo model in direct mode (O_DIRECT reads into flashmoe's own LRU
cache, sized to a quarter of all experts so that both hits and misses show), traced by the engine's
Tracer (flashmoe/runtime/trace.py); the compute time of each stage over the decode tokens; and the store's read
pattern measured on one expert file, one read at a time against k reads in flight (bench/bench_disk.py).
render: flashmoe.plot's figures into docs/figures/, then the document from tools/how_it_works.md.j2 with
the recorded numbers. The document is regenerated, never edited by hand: edit the template.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numba
import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROMPT = "To be, or not to be,"
TEMPLATE = Path(__file__).with_name("how_it_works.md.j2")
STAGE_NAMES = {"attention": "token mixers (attention, linear attention) and norms", "router": "routers",
               "shared_expert": "shared experts", "experts": "routed experts (compute)",
               "dense_mlp": "dense MLP layers", "lm_head": "final norm and LM head"}


# ---- record ------------------------------------------------------------------------------------------

def record(model_dir: Path, figures: Path, prompt: str, tokens: int, backend: str, cache_fraction: float) -> dict:
    """Run the model and write figures/trace.jsonl and figures/run.json; returns the run dict.

    The prompt is generated once untraced first, so that one-time costs (a JIT backend compiling its kernels)
    stay out of the recorded run; the recorded one starts with an empty cache and fresh statistics. Times
    per decode token are medians over the decode tokens, which a machine shared with other work needs."""
    from flashmoe.serve.generate import generate_steps
    from flashmoe.runtime.load import load_engine
    from flashmoe.serve.sampling import Sampler
    from flashmoe.serve.tokenizer import Tokenizer
    from flashmoe.runtime.trace import record_trace

    figures.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(model_dir)
    prompt_ids = tokenizer.encode(prompt)
    engine = load_engine(model_dir, backend=backend, io="direct", context=len(prompt_ids) + tokens + 1)
    md, cfg = engine.model_dir, engine.cfg
    entries = max(1, round(cache_fraction * cfg.num_experts * len(md.moe_layers)))
    for _ in generate_steps(engine, tokenizer, prompt_ids, Sampler(), tokens):
        pass
    _fresh_store(engine, entries)
    stats = engine.stats
    text, ids, marks = [], [], []  # marks: (stage seconds, counters, time) after prefill and each decode forward

    def mark() -> None:
        marks.append((dict(stats.stage_s), replace(stats.totals), time.perf_counter()))

    load_average = os.getloadavg()[1]  # over the last 5 minutes: how busy the machine was
    t0 = time.perf_counter()
    with record_trace(engine, figures / "trace.jsonl", model=model_dir.name):
        for step in generate_steps(engine, tokenizer, prompt_ids, Sampler(), tokens):
            mark()
            text.append(step.text)
            ids.append(step.token_id)
        mark()
    engine.store.close()
    # Between two marks runs one decode forward, except after the last token when it was an end-of-sequence
    # token (generation stops without one): the trace's decode lines count the forwards.
    n_decode = sum('"prefill":true' not in line for line in (figures / "trace.jsonl").read_text().splitlines()[1:])
    decode = [(b[2] - a[2], {k: v - a[0].get(k, 0.0) for k, v in b[0].items()}, b[1] - a[1])
              for a, b in list(zip(marks, marks[1:]))[:n_decode]]
    totals = stats.totals - marks[0][1]
    run = {
        "model": model_dir.name, "backend": backend, "io": "direct", "o_direct": engine.store.direct,
        "cache_entries": entries, "cache_fraction": cache_fraction, "policy": "lru", "io_threads": engine.store.threads,
        "prompt": prompt, "prompt_tokens": len(prompt_ids), "generated": "".join(text), "decode_tokens": n_decode,
        "generated_tokens": len(ids), "reference_agrees": reference_agreement(model_dir, prompt_ids, ids),
        "ttft_s": marks[0][2] - t0,
        "decode_ms_per_token": 1e3 * float(np.median([w for w, _, _ in decode])),
        "decode_ms_per_token_mean": 1e3 * float(np.mean([w for w, _, _ in decode])),
        "stage_ms_per_decode_token": {name: 1e3 * float(np.median([st.get(name, 0.0) for _, st, _ in decode]))
                                      for name in stats.stage_s},
        "io_wait_ms_per_decode_token": 1e3 * float(np.median([c.io_wait_s for _, _, c in decode])),
        "other_ms_per_decode_token": 1e3 * float(np.median([w - c.compute_s - c.io_wait_s for w, _, c in decode])),
        "decode_hits": totals.hits, "decode_misses": totals.misses,
        "totals": {"bytes_read": stats.totals.bytes_read, "disk_bytes": stats.totals.disk_bytes,
                   "reads": stats.totals.reads, "hits": stats.totals.hits, "misses": stats.totals.misses},
        "read_pattern": read_pattern([md.expert_path(layer) for layer in md.moe_layers], cfg.num_experts,
                                     md.layout.stride, md.layout.nbytes, engine.k),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "compute_threads": numba.get_num_threads(), "load_average": load_average},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    (figures / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    return run


def reference_agreement(model_dir: Path, prompt_ids: list[int], generated: list[int]) -> int:
    """How many of the `generated` greedy tokens flashmoe's NumPy reference (flashmoe.reference.ReferenceModel,
    float32, no expert store) produces too from the same prompt, before the first difference."""
    from flashmoe.reference.model import ReferenceModel

    ref = ReferenceModel.from_dir(model_dir)
    cache = ref.new_cache()
    logits = ref.forward(np.asarray(prompt_ids), cache)
    for n, token in enumerate(generated):
        if int(np.argmax(logits[-1])) != token:
            return n
        logits = ref.forward(np.array([token]), cache)
    return len(generated)


def _fresh_store(engine, entries: int) -> None:
    """Give `engine` an empty direct-mode LRU cache of `entries` experts and fresh statistics.

    load_engine sizes the own cache from --max-memory, which also counts this process's RSS; the figures
    want a cache of a fixed share of the experts instead."""
    from flashmoe.runtime.stats import Stats
    from flashmoe.runtime.expert_files import slot_bytes
    from flashmoe.runtime.store import ExpertStore

    md, threads = engine.model_dir, engine.store.threads
    engine.store.close()
    engine.stats = Stats(num_layers=len(md.moe_layers))
    engine.store = ExpertStore({layer: md.expert_path(layer) for layer in md.moe_layers}, engine.cfg.num_experts,
                               md.layout.stride, md.layout.nbytes, mode="direct",
                               cache_bytes=entries * slot_bytes(md.layout.nbytes), policy="lru", threads=threads,
                               stats=engine.stats)


def read_pattern(paths: list[Path], num_experts: int, stride: int, nbytes: int, k: int) -> dict:
    """Cold O_DIRECT reads of every expert of each file through the store: fetches of 1 expert against
    fetches of k with all k in flight, alternating (bench/bench_disk.measure_store, 5 passes per file and
    pattern); the median GB/s over all passes of each pattern."""
    from flashmoe.bench.bench_disk import measure_store

    runs: dict[int, list[float]] = {1: [], k: []}
    for path in paths:
        for threads in runs:
            runs[threads] += measure_store(path, num_experts, stride, nbytes, "direct", threads=threads, cold=True,
                                           repeats=5)["gb_s_runs"]
    return {"k": k, "expert_bytes": nbytes, "passes": len(runs[k]), "one_gb_s": float(np.median(runs[1])),
            "k_gb_s": float(np.median(runs[k]))}


# ---- render ------------------------------------------------------------------------------------------

def render(model_dir: Path, figures: Path, doc: Path, disk_gbps: float) -> Path:
    """Draw the figures and write the document from figures/trace.jsonl and figures/run.json."""
    import jinja2

    from flashmoe.plot import plot_trace

    drawn = plot_trace(figures / "trace.jsonl", figures, max_tokens=40, model_dir=model_dir)
    missing = {name: why for name, why in drawn.items() if isinstance(why, str)}
    if missing:
        raise SystemExit(f"figures not drawn: {missing}")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE.parent), trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters.update(bytes=_bytes, count=_count, code=_code)
    ctx = context(model_dir, figures, doc, disk_gbps)
    doc.write_text(env.get_template(TEMPLATE.name).render(**ctx))
    return doc


def context(model_dir: Path, figures: Path, doc: Path, disk_gbps: float) -> dict:
    """Every number and link the template uses."""
    from flashmoe.runtime.replay import replay
    from flashmoe.info import model_stats
    from flashmoe.format.modeldir import ModelDir
    from flashmoe.plot import load_arrays, token_labels
    from flashmoe.runtime.expert_files import slot_bytes

    run = json.loads((figures / "run.json").read_text())
    t = load_arrays(figures / "trace.jsonl")
    labels = token_labels(t.tokens, model_dir)
    with ModelDir.open(model_dir) as md:
        cfg, s = md.config, model_stats(md)
        layout = md.layout
        quant = {p: layout.quantization[p] for p in layout.quantization}
        stride = layout.stride
    n_prompt = int(t.prefill.sum())
    walk = walk_token(t, n_prompt, labels)
    layers = []
    for j, layer in enumerate(t.header.moe_layers):
        layers.append({
            "index": layer, "type": cfg.layer_type(layer).replace("_", " "),
            "experts": [(int(e), float(w), bool(h)) for e, w, h in zip(t.experts[walk, j], t.weights[walk, j],
                                                                         t.hit[walk, j])],
            "bytes_read": int(t.bytes_read[walk, j]), "io_wait_ms": float(t.io_wait_ms[walk, j]),
            "compute_ms": float(t.compute_ms[walk, j]),
        })
    decode_rows = ~t.prefill
    hits = int(t.hit[decode_rows].sum())
    lookups = int(t.hit[decode_rows].size)
    rep = replay(figures / "trace.jsonl", fractions=(run["cache_fraction"],))
    big = big_model(disk_gbps)
    rel = os.path.relpath(REPO, doc.parent)
    stages = [(STAGE_NAMES.get(name, name), ms) for name, ms in run["stage_ms_per_decode_token"].items()]
    q = quant.get("gate_proj")
    return {
        "run": run, "cfg": cfg, "s": s, "quant": quant, "stride": stride, "disk_gbps": disk_gbps,
        "n_prompt": n_prompt, "n_tokens": len(t.experts), "walk_pos": walk, "walk_text": labels[walk],
        "walk_next": labels[walk + 1] if walk + 1 < len(labels) else "",
        "prompt_labels": labels[:n_prompt], "layers": layers,
        "walk_bytes": sum(x["bytes_read"] for x in layers), "walk_io_ms": sum(x["io_wait_ms"] for x in layers),
        "walk_compute_ms": sum(x["compute_ms"] for x in layers),
        "walk_hits": sum(h for x in layers for _, _, h in x["experts"]),
        "decode_hit_rate": hits / lookups if lookups else 0.0,
        "replay_lru": rep["sizes"][0]["hit_rate"]["lru"], "replay_opt": rep["sizes"][0]["hit_rate"]["opt"],
        "ceiling_tok_s": disk_gbps * 1e9 / s["expert_bytes_per_token"],
        "big": big, "fig": os.path.relpath(figures, doc.parent), "ref": reference_links(rel),
        "run_token": t.tokens[walk], "n_full": cfg.layer_types.count("full_attention"),
        "n_linear": cfg.layer_types.count("linear_attention"),
        "conv_dim": 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
        + cfg.linear_num_value_heads * cfg.linear_value_head_dim,
        "quant_text": f"{q.bits}-bit, groups of {q.group_size}" if q else "float",
        "read_bytes": slot_bytes(int(s["expert_bytes"])), "stages": stages,
        "prompt_lookups": int(t.hit[t.prefill].size), "prompt_reads": int((~t.hit[t.prefill]).sum()),
    }


def walk_token(t, n_prompt: int, labels: list[str]) -> int:
    """The token the document follows: past the first quarter of the decode tokens, the first that decodes
    to a word (a letter or digit) on its own, whose experts include both cache hits and misses (it shows
    both paths) and whose time is typical (at most 1.5 times the median decode token's, so not one that
    another process on the machine delayed); else the first after that quarter."""
    start = n_prompt + (len(t.experts) - n_prompt) // 4
    spent = t.compute_ms.sum(axis=1) + t.io_wait_ms.sum(axis=1)
    typical = 1.5 * np.median(spent[n_prompt:])
    for pos in range(start, len(t.experts)):
        if (any(c.isalnum() for c in labels[pos]) and t.hit[pos].any() and not t.hit[pos].all()
                and spent[pos] <= typical):
            return pos
    return start


def big_model(disk_gbps: float) -> dict:
    """The same arithmetic for Qwen3.5-397B-A17B (flashmoe's preset) at 4 bits, group 64, for its own k = 10
    and Flash-MoE's k = 4: parameters, resident and expert bytes, bytes per token and the ceiling."""
    import math

    from flashmoe.arch.config import ModelConfig
    from flashmoe.arch.tensors import resident_shapes
    from flashmoe.arch.presets import get_preset
    from flashmoe.convert.synth import expert_layout, planned_bytes

    cfg = ModelConfig.from_dict(get_preset("qwen3.5-397b-a17b").config, source="preset qwen3.5-397b-a17b")
    resident_params = sum(math.prod(shape) for shape in resident_shapes(cfg).values())
    expert_params = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    layers = len(cfg.moe_layers)
    resident_bytes, expert_file_bytes = planned_bytes(cfg, 4, 64)
    nbytes = expert_layout(cfg, 4, 64).nbytes
    per_k = {k: {"active_params": resident_params + expert_params * k * layers,
                 "bytes_per_token": k * layers * nbytes,
                 "ceiling_tok_s": disk_gbps * 1e9 / (k * layers * nbytes)} for k in (cfg.num_experts_per_tok, 4)}
    return {"cfg": cfg, "layers": layers, "total_params": resident_params + expert_params * cfg.num_experts * layers,
            "expert_params_all": expert_params * cfg.num_experts * layers, "resident_params": resident_params,
            "expert_params": expert_params,
            "resident_bytes": resident_bytes, "expert_file_bytes": expert_file_bytes, "expert_bytes": nbytes,
            "k": per_k}


def reference_links(rel: str) -> dict[str, str]:
    """Markdown links `name` -> path#Lline to the reference's and the engine's functions (line numbers from
    the source, so they stay right when the code moves)."""
    import flashmoe.runtime.engine as engine
    import flashmoe.reference.attention as attention
    import flashmoe.reference.linear_attention as linear_attention
    import flashmoe.reference.model as model
    import flashmoe.reference.moe as moe
    import flashmoe.reference.ops as ops
    import flashmoe.reference.rope as rope
    import flashmoe.reference.routing as routing
    import flashmoe.runtime.store as store

    objects = {
        "ReferenceModel.forward": model.ReferenceModel.forward, "rms_norm": ops.rms_norm, "linear": ops.linear,
        "gated_delta_net": linear_attention.gated_delta_net, "causal_conv1d": linear_attention.causal_conv1d,
        "l2_normalize": ops.l2_normalize, "gated_delta_rule": linear_attention.gated_delta_rule,
        "gated_rms_norm": linear_attention.gated_rms_norm, "attention": attention.attention,
        "rope_cos_sin": rope.rope_cos_sin, "apply_rope": rope.apply_rope, "softmax": ops.softmax,
        "moe_block": moe.moe_block, "route": routing.route, "swiglu": moe.swiglu, "silu": ops.silu,
        "sigmoid": ops.sigmoid, "Engine.forward": engine.Engine.forward, "Engine._moe": engine.Engine._moe,
        "Engine._moe_decode": engine.Engine._moe_decode, "Engine._moe_prefill": engine.Engine._moe_prefill,
        "ExpertStore.fetch": store.ExpertStore.fetch, "ExpertStore.wait": store.ExpertStore.wait,
    }
    links = {}
    for name, obj in objects.items():
        path = Path(inspect.getsourcefile(obj)).resolve().relative_to(REPO)
        links[name] = f"[`{name}`]({rel}/{path}#L{inspect.getsourcelines(obj)[1]})"
    return links


def _three_digits(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _bytes(n: float) -> str:
    """Decimal units, as disk bandwidth is quoted: 41472 -> '41.5 kB'."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{_three_digits(n / size)} {unit}"
    return f"{int(n)} B"


def _count(n: float) -> str:
    """396346350336 -> '396B'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return _three_digits(n / size) + unit
    return f"{int(n)}"


def _code(text: str) -> str:
    """`text` as a Markdown code span, whatever backticks it holds (CommonMark: a fence longer than any
    backtick run inside, padded with spaces when the text starts or ends with a backtick)."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", nargs="?", choices=("record", "render", "all"), default="all")
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the bundled demo model)")
    ap.add_argument("--figures", type=Path, default=REPO / "docs" / "figures")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "how-it-works.md")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--tokens", type=int, default=32, help="tokens to generate")
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--cache-fraction", type=float, default=0.25, help="own cache size, share of all experts")
    ap.add_argument("--disk-gbps", type=float, default=2.0, help="disk bandwidth for the ceiling arithmetic")
    ap.add_argument("--threads", type=int, default=1, help="compute threads (NUMBA_NUM_THREADS); 1 keeps the "
                    "timings steady on a machine shared with other work")
    a = ap.parse_args(argv)
    # Threads of this (main) thread's parallel regions: setting NUMBA_NUM_THREADS here instead would make
    # numba raise at its next compilation in a process that has already started its pool (the tests).
    numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    from flashmoe.runtime.load import default_model_dir

    model_dir = a.model or default_model_dir()
    if a.step in ("record", "all"):
        record(model_dir, a.figures, a.prompt, a.tokens, a.backend, a.cache_fraction)
    if a.step in ("render", "all"):
        print(render(model_dir, a.figures, a.doc, a.disk_gbps))


if __name__ == "__main__":
    sys.exit(main())
