"""Markdown tables and matplotlib figures of a `flashmoe bench` result (the dict bench/streaming.py writes).

Figures (PNG, written beside the JSON):
- `ms_per_layer.png`: decode ms per MoE layer for each run, split into compute (by stage), I/O wait and
  the rest, next to the disk-bound time per layer;
- `hit_rate_vs_cache.png`: hit rate against cache size for each eviction policy, one panel per trace;
- `tok_s_vs_budget.png`: cold and warm decode tok/s against --max-memory, per mode and k, with the
  disk-bound ceiling.
"""

from __future__ import annotations

from pathlib import Path

from flashmoe.plot import hit_rate_figure

GB = 1e9
_STAGE_COLORS = {"attention": "tab:blue", "router": "tab:orange", "shared_expert": "tab:green",
                 "experts": "tab:purple", "dense_mlp": "tab:olive"}


def run_label(run: dict) -> str:
    """Short name of a run: mode, k, compute threads, budget and speculation, e.g. 'direct k=4 t=2 4G spec'."""
    spec = " spec" if run.get("speculate") else ""
    return f"{run['io']} k={run['k']} t={run['compute_threads']} {run['max_memory'] or 'no cap'}{spec}"


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(result: dict) -> str:
    """The result as Markdown: machine and disk, one row per run and pass, then the replays."""
    m = result["machine"]
    lines = [f"Machine: {m['cpus']} CPUs, {m['memory_bytes'] / 2**30:.0f} GiB RAM, kernel {m['kernel']}."]
    if "model" in result:
        lines += _decode_tables(result)
    if result.get("peer_runs"):
        lines += _peer_tables(result)
    for r in result.get("replays", []):
        policies = list(r["sizes"][0]["hit_rate"])
        lines += [
            "",
            f"Replay of `{r['trace']}` ({r['kind']}): {r['tokens']} tokens, {r['lookups']} lookups, "
            f"{r['distinct_experts']} distinct of {r['num_experts'] * r['moe_layers']} experts, k={r['experts_per_token']}.",
            "",
            "| cache (% of experts) | entries | " + " | ".join(policies) + " |",
            "|---|---|" + "---|" * len(policies),
        ]
        for s in r["sizes"]:
            lines.append(f"| {100 * s['fraction']:g}% | {s['entries']} | "
                         + " | ".join(f"{s['hit_rate'][p]:.1%}" for p in policies) + " |")
    return "\n".join(lines) + "\n"


def _decode_tables(result: dict) -> list[str]:
    model, disk = result["model"], result["disk"]
    lines = [
        f"Model: `{model['dir']}` — {model['description']}; expert files {model['expert_file_bytes'] / GB:.1f} GB "
        f"({model['moe_layers']} MoE layers), resident {model['resident_bytes'] / GB:.2f} GB. "
        f"Disk: {disk['filesystem']['device']} ({disk['filesystem']['fstype']}).",
        "",
        "Disk bandwidth for the store's read pattern (cold, one expert per read, k reads in flight):",
        "",
        "| mode | reads in flight | GB/s (median) | runs |",
        "|---|---|---|---|",
    ]
    for d in disk["store"]:
        lines.append(f"| {d['mode']} | {d['threads']} | {d['gb_s']:.2f} | "
                     f"{' '.join(f'{x:.2f}' for x in d['gb_s_runs'])} |")
    lines += [
        "",
        "| run | pass | tok/s | ms/token | ms/layer (compute + I/O wait + other) | lm_head ms | expert GB read/token "
        "(from disk) | achieved GB/s | hit rate | peak RSS GiB | disk-bound tok/s | bound ms/token | time ÷ bound | "
        "time ÷ reference bound | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        for name, p in run["passes"].items():
            c = p.get("ceiling", {})
            other = p["ms_per_layer"] - p["compute_ms_per_layer"] - p["io_wait_ms_per_layer"]
            mark = " ⚠" if name == "cold" and _cold_faster_than_warm(run) else ""
            lines.append(
                f"| {run_label(run)} | {name} | {p['tok_s']:.3f}{mark} | {p['ms_per_token']:.0f} | "
                f"{p['ms_per_layer']:.1f} ({p['compute_ms_per_layer']:.1f} + {p['io_wait_ms_per_layer']:.1f} + "
                f"{other:.1f}) | {p['lm_head_ms_per_token']:.0f} | {p['bytes_read_per_token'] / GB:.3f} "
                f"({p['disk_bytes_per_token'] / GB:.3f}) | {p['achieved_gb_s']:.2f} | "
                f"{_f(p['hit_rate'], '.1%')} | {run['peak_rss_bytes'] / 2**30:.2f} | "
                f"{_f(c.get('disk_bound_tok_s'))} | {_f(c.get('bound_ms'), '.0f')} | {_f(c.get('time_over_bound'))} | "
                f"{_f(c.get('time_over_reference_bound'))} | "
                f"{'–'.join(f'{x:.1f}' for x in run.get('loadavg_1min', []))} |")
    lines += _cold_faster_warnings(result["runs"])
    lines += [
        "",
        "Reading the table: runs labelled `no cap` are the uncapped pagecache reference (its warm pass has every "
        "expert in memory: the compute-only time); the others run under `--max-memory` (in a cgroup of that size "
        "with `--cgroup`). A `warm` pass repeats the cold pass's tokens: it finds what the budget kept (direct: "
        "flashmoe's own cache; pagecache: the page cache). disk-bound tok/s = 1 / (expert bytes from disk per "
        "token ÷ the disk's measured bandwidth); bound ms/token = max(that disk time, this pass's own compute "
        "time); time ÷ bound = 1.00 when I/O and compute fully overlap. time ÷ reference bound uses the reference's "
        "warm time instead of the pass's own compute (below 1 when the load changed between the runs).",
    ]
    return lines


def _cold_faster_than_warm(run: dict) -> bool:
    passes = run["passes"]
    return "cold" in passes and "warm" in passes and passes["cold"]["tok_s"] > passes["warm"]["tok_s"]


def _cold_faster_warnings(runs: list[dict]) -> list[str]:
    """A warning under the table for each run whose cold pass came out faster than its warm pass (marked ⚠ in
    the table): the warm pass repeats the same tokens with more of them in memory, so it cannot be slower
    unless the machine got busier, and a cold pass that fast may not have read from disk at all."""
    lines = []
    for run in runs:
        if _cold_faster_than_warm(run):
            cold, warm = run["passes"]["cold"]["tok_s"], run["passes"]["warm"]["tok_s"]
            load = "–".join(f"{x:.1f}" for x in run.get("loadavg_1min", [])) or "not recorded"
            lines += ["", f"⚠ warning: {run_label(run)}: the cold pass ({cold:.3f} tok/s) came out faster than the "
                      f"warm pass ({warm:.3f} tok/s), which repeats its tokens with more in memory: the machine "
                      f"was loaded (1-minute load average {load}) or the cold pass was not cold (the expert files "
                      "stayed in the page cache). Neither pass measures what its name says; rerun on an idle machine."]
    return lines


def _peer_tables(result: dict) -> list[str]:
    peer = result["peer"]
    lines = [
        "",
        f"Peer: {peer['engine']} (`{peer['runner']}`) on `{peer['gguf']}` ({peer['gguf_bytes'] / GB:.2f} GB), the same "
        "prompt and decode token ids, k, compute threads and memory cap.",
        "",
        "| llama.cpp run | pass | tok/s | ms/token | peak RSS GiB | cgroup peak GiB | GB read from disk (whole run) | load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in result["peer_runs"]:
        cap = run.get("cgroup_max_usage_bytes")
        for name, p in run["passes"].items():
            lines.append(
                f"| k={run['k']} t={run['compute_threads']} {run['max_memory'] or 'no cap'}"
                f"{'' if run.get('repack', True) else ' no-repack'} | {name} | "
                f"{_f(p['tok_s'], '.3f')} | {_f(p['ms_per_token'], '.0f')} | {run['peak_rss_bytes'] / 2**30:.2f} | "
                f"{_f(cap and cap / 2**30)} | {run['disk_read_bytes'] / GB:.2f} | "
                f"{'–'.join(f'{x:.1f}' for x in run['loadavg_1min'])} |")
    lines += ["", "| flashmoe run | pass | flashmoe tok/s | llama.cpp tok/s | flashmoe ÷ llama.cpp | prompt tokens | "
              "flashmoe prompt tok/s | llama.cpp prompt tok/s | prompt ratio |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in result["side_by_side"]:
        lines.append(f"| {row['flashmoe']} | {row['pass']} | {row['flashmoe_tok_s']:.3f} | {row['llama_cpp_tok_s']:.3f} | "
                     f"{row['ratio']:.2f}× | {row['prompt_tokens']} | {row['flashmoe_prompt_tok_s']:.2f} | "
                     f"{row['llama_cpp_prompt_tok_s']:.2f} | {row['prompt_ratio']:.2f}× |")
    return lines


def figures(result: dict, out_dir: Path) -> list[Path]:
    """Draw the figures that the result has data for into out_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    runs = result["runs"]
    if runs:
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(runs) * 2), 4.5))
        labels, x = [], 0
        drawn = set()
        for run in runs:
            for name, p in run["passes"].items():
                bottom = 0.0
                n_layers = run["moe_layers"]
                for stage, color in _STAGE_COLORS.items():
                    v = p["stage_ms_per_token"].get(stage, 0.0) / n_layers
                    if v:
                        ax.bar(x, v, bottom=bottom, color=color, label=None if stage in drawn else stage)
                        drawn.add(stage)
                        bottom += v
                for part, color in (("io_wait", "tab:red"), ("other", "lightgray")):
                    v = (p["io_wait_ms_per_layer"] if part == "io_wait" else
                         p["ms_per_layer"] - p["compute_ms_per_layer"] - p["io_wait_ms_per_layer"])
                    ax.bar(x, max(v, 0.0), bottom=bottom, color=color, label=None if part in drawn else
                           {"io_wait": "I/O wait", "other": "other (Python glue)"}[part])
                    drawn.add(part)
                    bottom += max(v, 0.0)
                disk_ms = p.get("ceiling", {}).get("disk_ms_per_layer")
                if disk_ms is not None:
                    ax.plot([x - 0.4, x + 0.4], [disk_ms] * 2, color="black", lw=2,
                            label=None if "disk" in drawn else "disk-bound time")
                    drawn.add("disk")
                labels.append(f"{run_label(run)}\n{name}")
                x += 1
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("ms per MoE layer per token (lm_head excluded)")
        ax.set_title(f"Decode time per layer\n{result['model']['description']}", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "ms_per_layer.png"))

        budgets = [r for r in runs if r["max_memory"]]
        if budgets:
            fig, ax = plt.subplots(figsize=(6.5, 4.5))
            groups: dict[tuple, list[dict]] = {}
            for r in budgets:
                groups.setdefault((r["io"], r["k"], r["compute_threads"], bool(r.get("speculate"))), []).append(r)
            for (io, k, t, spec), rs in sorted(groups.items()):
                rs.sort(key=lambda r: r["max_memory_bytes"])
                xs = [r["max_memory_bytes"] / 2**30 for r in rs]
                for name, style in (("cold", "-o"), ("warm", "--s")):
                    if all(name in r["passes"] for r in rs):
                        ax.plot(xs, [r["passes"][name]["tok_s"] for r in rs], style, label=f"{io} k={k} t={t}{' spec' if spec else ''} {name}")
                ceiling = [r["passes"]["cold"].get("ceiling", {}).get("disk_bound_tok_s") for r in rs]
                if all(c is not None for c in ceiling):
                    ax.plot(xs, ceiling, ":", color="gray", label=f"disk-bound ceiling {io} k={k}")
            ax.set_xlabel("--max-memory (GiB)")
            ax.set_ylabel("decode tok/s")
            ax.set_title(f"tok/s vs memory budget\n{result['model']['description']}", fontsize=8)
            ax.legend(fontsize=7)
            fig.tight_layout()
            written.append(_save(fig, out_dir / "tok_s_vs_budget.png"))

    if result.get("replays"):
        written.append(_save(hit_rate_figure(result["replays"]), out_dir / "hit_rate_vs_cache.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
