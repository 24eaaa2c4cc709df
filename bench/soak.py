"""Soak test of `flashmoe serve` under held load (a benchmark, not a unit test): results go to docs/serving.md.

Starts `flashmoe serve` on a model (default: the bundled demo model) in its own process, then:

1. Solo: each request of a fixed set — a few prompts, each through the OpenAI chat API and the Anthropic
   Messages API, streamed and not, at temperature 0 — runs alone once; its reply text is the reference.
2. Soak: `--clients` threads (default 8) send requests picked at random from the set for `--seconds`. A
   fraction `--disconnect` of them are streamed requests that the client abandons after a random number of
   events (the server must cancel them and carry on). Every other reply must equal its solo reference.
3. Throughout, the server process's resident set size (VmRSS) is sampled every `--sample` seconds.

Prints, and writes as JSON to --out: requests by kind, errors (anything but the deliberate disconnects),
replies that differ from their solo run, time to first token (client side, streamed requests: from sending
the request to the first text, queueing included) p50/p99, and the RSS curve with its drift after warm-up
(the first fifth of the run).

    python bench/soak.py --seconds 600 --out /tmp/soak.json
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import anthropic
import openai

# anthropic 2.x has no temperature argument on messages.create (newer Claude models dropped it); the API field stays.
GREEDY = {"temperature": 0}
PROMPTS = ["Tell me about the sea.", "What is a king?", "Write two lines about the moon.",
           "Who was Romeo?", "Say something about winter."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Client:
    """One client's connections to both APIs; `run(spec, stop_after)` returns (text, ttft_s or None)."""

    def __init__(self, url: str, max_tokens: int):
        self.oa = openai.OpenAI(base_url=url + "/v1", api_key="soak", max_retries=0, timeout=600)
        self.an = anthropic.Anthropic(base_url=url, api_key="soak", max_retries=0, timeout=600)
        self.max_tokens = max_tokens
        self.model = self.oa.models.list().data[0].id  # the server answers 404 to another name

    def run(self, spec: tuple[str, str, bool], stop_after: int | None = None) -> tuple[str, float | None]:
        api, prompt, stream = spec
        messages = [{"role": "user", "content": prompt}]
        t0 = time.perf_counter()
        if not stream:
            if api == "openai":
                r = self.oa.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                    max_tokens=self.max_tokens)
                return r.choices[0].message.content or "", None
            r = self.an.messages.create(model=self.model, messages=messages, max_tokens=self.max_tokens, extra_body=GREEDY)
            return "".join(b.text for b in r.content if b.type == "text"), None
        pieces, ttft = [], None
        if api == "openai":
            events = self.oa.chat.completions.create(model=self.model, messages=messages, temperature=0, stream=True,
                                                     max_tokens=self.max_tokens)
            texts, close = (c.choices[0].delta.content or "" for c in events if c.choices), events.close
        else:
            texts = _anthropic_texts(self.an.messages.stream(model=self.model, messages=messages, extra_body=GREEDY,
                                                             max_tokens=self.max_tokens))
            close = texts.close
        try:
            for n, text in enumerate(texts):
                if text and ttft is None:
                    ttft = time.perf_counter() - t0
                pieces.append(text)
                if stop_after is not None and n + 1 >= stop_after:
                    break
        finally:
            close()  # mid-reply, this drops the connection: the server must cancel the job
        return "".join(pieces), ttft


def _anthropic_texts(manager):
    with manager as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                yield event.delta.text


def soak(url: str, specs: list, reference: dict, args, pid: int) -> dict:
    deadline = time.monotonic() + args.seconds
    lock = threading.Lock()
    result = {"requests": 0, "disconnects": 0, "errors": [], "mismatches": [], "ttft_s": [], "by_kind": {}}

    def worker(seed: int) -> None:
        rng, client = random.Random(seed), Client(url, args.max_tokens)
        while time.monotonic() < deadline:
            spec = rng.choice(specs)
            cut = rng.random() < args.disconnect
            if cut:
                spec = (spec[0], spec[1], True)
            try:
                text, ttft = client.run(spec, stop_after=rng.randint(1, 4) if cut else None)
            except Exception as e:  # the benchmark counts every failure; none is expected
                with lock:
                    result["errors"].append(f"{spec}: {type(e).__name__}: {e}")
                continue
            kind = f"{spec[0]} {'stream' if spec[2] else 'whole'}" + (" cut" if cut else "")
            with lock:
                result["requests"] += 1
                result["by_kind"][kind] = result["by_kind"].get(kind, 0) + 1
                result["disconnects"] += cut
                if ttft is not None and not cut:
                    result["ttft_s"].append(ttft)
                if not cut and text != reference[spec]:
                    result["mismatches"].append({"spec": spec, "got": text, "solo": reference[spec]})

    rss, stop = [], threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.wait(args.sample):
            rss.append((round(time.monotonic() - t0, 1), round(_rss_mib(pid), 1)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sampler.join()
    result["rss_mib"] = rss
    return result


def summary(result: dict, args, solo_s: float) -> str:
    ttft = sorted(result["ttft_s"])
    rss = result["rss_mib"]
    after = [m for t, m in rss if t >= args.seconds / 5]
    lines = [f"{args.clients} clients for {args.seconds:.0f} s, max_tokens {args.max_tokens}, backend {args.backend}; "
             f"solo runs took {solo_s:.1f} s",
             f"requests completed: {result['requests']} ({result['disconnects']} abandoned mid-stream on purpose); "
             + ", ".join(f"{k}: {n}" for k, n in sorted(result["by_kind"].items())),
             f"errors: {len(result['errors'])}; replies different from their solo run: {len(result['mismatches'])}"]
    if ttft:
        p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
        lines.append(f"time to first token (client side, streamed, queueing included): p50 "
                     f"{statistics.median(ttft):.2f} s, p99 {p99:.2f} s over {len(ttft)} requests")
    if after:
        lines.append(f"server RSS: {rss[0][1]:.0f} MiB at {rss[0][0]:.0f} s; after warm-up ({args.seconds / 5:.0f} s) "
                     f"min {min(after):.0f}, max {max(after):.0f}, last {after[-1]:.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the bundled demo model)")
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--disconnect", type=float, default=0.15, help="fraction of requests abandoned mid-stream")
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "flashmoe", "serve", *([args.model] if args.model else []), "--port", str(port),
               "--backend", args.backend, "--context", "1024"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"flashmoe serve exited: {server.stderr.read()}")
                time.sleep(0.5)
        specs = [(api, prompt, stream) for api in ("openai", "anthropic") for prompt in PROMPTS
                 for stream in (False, True)]
        t0 = time.perf_counter()
        solo = Client(url, args.max_tokens)
        reference = {spec: solo.run(spec)[0] for spec in specs}
        solo_s = time.perf_counter() - t0
        result = soak(url, specs, reference, args, server.pid)
        print(summary(result, args, solo_s))
        for error in result["errors"][:10]:
            print("error:", error)
        if args.out:
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **result,
                                            "solo_s": solo_s}, indent=1, default=list))
        return 1 if result["errors"] or result["mismatches"] else 0
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
