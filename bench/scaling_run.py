"""Warm decode at several thread counts: flashmoe checkouts side by side with llama.cpp, in one run.

`python -m flashmoe.bench.scaling_run --model DIR --gguf MODEL.gguf --runner flashmoe-llama-run
--tree before=PATH --tree after=PATH --threads 16,1,8,4,2 --json OUT.json` runs, for each thread count in
turn, `flashmoe.bench.decode_run` in each checkout (a child process whose working directory and PYTHONPATH
are that checkout, NUMBA_NUM_THREADS the thread count, plus the tree's --env NAME:KEY=VALUE settings; q8 activations, pagecache, passes cold then warm)
and llama.cpp (bench/llama_cpp.run_llama, its defaults) on the GGUF export of the same model, with the same
prompt and decode ids (decode_run.decode_inputs); without --gguf, the checkouts alone. Engines alternate within each thread count, so a change
in the machine's load falls on all of them alike. Each row is written to the JSON as it completes (a run
cut short keeps what it has) and printed; the end prints Markdown tables of warm decode tok/s and warm prompt
(prefill) tok/s, and the ratio of each checkout to llama.cpp. bench/device_scaling.sh builds what this needs on a bare machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from flashmoe.bench.decode_run import decode_inputs
from flashmoe.bench.llama_cpp import run_llama
from flashmoe.format.modeldir import ModelDir


def flashmoe_row(tree: Path, model: Path, threads: int, prompt_tokens: int, tokens: int, out: Path,
                 env: dict[str, str] | None = None) -> dict:
    """decode_run in checkout `tree` at `threads` numba threads, with `env` added to the environment; warm-pass
    figures, or the error's last lines."""
    cmd = [sys.executable, "-m", "flashmoe.bench.decode_run", "--model", str(model), "--io", "pagecache",
           "--prompt-tokens", str(prompt_tokens), "--tokens", str(tokens), "--passes", "cold,warm",
           "--activations", "q8", "--json", str(out)]
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), PYTHONPATH=str(tree), **(env or {}))
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-3:]}
    warm = json.loads(out.read_text())["passes"]["warm"]
    keys = ("tok_s", "ms_per_token", "compute_ms_per_token", "io_wait_ms_per_token", "lm_head_ms_per_token",
            "stage_ms_per_token", "ttft_s", "prefill_stage_s")
    return {k: warm[k] for k in keys}


def llama_row(runner: Path, gguf: Path, threads: int, prompt, decode) -> dict:
    r = run_llama(runner, gguf, threads, prompt, decode, ("cold", "warm"))
    warm = r["passes"]["warm"]
    return {"tok_s": warm["tok_s"], "ms_per_token": warm["ms_per_token"], "ttft_s": warm["ttft_s"]}


def markdown(rows: list[dict], trees: list[str], prompt_tokens: int) -> str:
    """Two tables: warm decode tok/s, and warm prompt (prefill) tok/s = prompt_tokens ÷ ttft_s."""
    tables = []
    for what, value in (("tok/s", lambda r: r.get("tok_s")),
                        ("prompt tok/s", lambda r: r.get("ttft_s") and prompt_tokens / r["ttft_s"])):
        head = ["threads", *(f"{t} {what}" for t in trees), f"llama.cpp {what}", *(f"{t} ÷ llama.cpp" for t in trees)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for r in rows:
            fm = [value(r[t]) for t in trees]
            ll = value(r["llama.cpp"])
            cells = [str(r["threads"]), *(f"{v:.2f}" if v else "—" for v in fm), f"{ll:.2f}" if ll else "—",
                     *(f"{v / ll:.2f}×" if v and ll else "—" for v in fm)]
            lines.append("| " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--gguf", type=Path, help="the model's GGUF export, for llama.cpp (without it: no llama.cpp rows)")
    ap.add_argument("--runner", type=Path, help="flashmoe-llama-run (bench/llama_run.cpp)")
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a flashmoe checkout")
    ap.add_argument("--env", action="append", default=[],
                    help="NAME:KEY=VALUE, an environment variable for tree NAME's runs (e.g. the OpenMP wait policy)")
    ap.add_argument("--threads", default="16,1,8,4,2")
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    trees = dict(t.split("=", 1) for t in a.tree)
    envs: dict[str, dict[str, str]] = {}
    for e in a.env:
        name, setting = e.split(":", 1)
        envs.setdefault(name, {}).update([setting.split("=", 1)])
    prompt, decode = decode_inputs(ModelDir.open(a.model).config.vocab_size, a.prompt_tokens, a.tokens, 0)
    rows = []
    for threads in map(int, a.threads.split(",")):
        row = {"threads": threads}
        for name, path in trees.items():
            row[name] = flashmoe_row(Path(path).resolve(), a.model, threads, a.prompt_tokens, a.tokens,
                                     Path(tempfile.gettempdir()) / f"scaling-{name}-{threads}.json", envs.get(name))
        row["llama.cpp"] = llama_row(a.runner, a.gguf, threads, prompt, decode) if a.gguf else {}
        rows.append(row)
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(json.dumps(row), flush=True)
    print(markdown(rows, list(trees), a.prompt_tokens))


if __name__ == "__main__":
    main()
