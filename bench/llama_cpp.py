"""llama.cpp as the peer of `flashmoe bench --peer llama.cpp`: find or build it, run it, parse its timings.

Build (`find_or_build`): the llama.cpp that the `llama-cpp-python` source distribution on PyPI vendors
(`pip download --no-binary :all: --no-deps llama-cpp-python==VERSION`, its `vendor/llama.cpp`), configured
with cmake for the CPU only (`GGML_NATIVE=ON`, static libraries, no server, no tests) and built with ninja
under `nice -n 19`: the `llama` library and `llama-bench`, then bench/llama_run.cpp compiled against them as
`flashmoe-llama-run`. Everything lives in `~/.cache/flashmoe/llama.cpp/VERSION/` (or $FLASHMOE_LLAMA_CPP_DIR)
and a second run finds it there: about 15 minutes on 2 busy vCPUs the first time, nothing after.

Run (`run_llama`): `flashmoe-llama-run` loads the GGUF with llama.cpp's default parameters (mmap, as
llama-cli does), then, per pass, clears its KV cache, prefills the prompt ids in one batch and decodes the
given ids one per llama_decode — the same teacher-forced work bench/decode_run.py times for flashmoe, on
the same ids. Before it starts, the GGUF is dropped from the page cache (POSIX_FADV_DONTNEED), so its
first pass is cold like flashmoe's. The child runs in the caller's cgroup (`preexec`), so the same memory
cap holds for both engines; its peak RSS and the bytes it read from disk (ru_inblock) come from wait4.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from flashmoe.errors import FlashMoeError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
RUNNER = "flashmoe-llama-run"
_SOURCE = Path(__file__).with_name("llama_run.cpp")
_CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF")
_LIBS = ("src/libllama.a", "ggml/src/libggml.a", "ggml/src/libggml-cpu.a", "ggml/src/libggml-base.a")


def cache_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Where the build of `version` lives: $FLASHMOE_LLAMA_CPP_DIR, else ~/.cache/flashmoe/llama.cpp/VERSION."""
    env = os.environ.get("FLASHMOE_LLAMA_CPP_DIR")
    return Path(env) if env else Path.home() / ".cache" / "flashmoe" / "llama.cpp" / version


def find_runner(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path | None:
    """The cached flashmoe-llama-run of `version`, None when it has not been built (or was built from another
    bench/llama_run.cpp than this checkout's)."""
    root = cache_dir(version)
    runner = root / "bin" / RUNNER
    try:
        built_from = json.loads((root / "build.json").read_text()).get("runner_source_sha256")
    except (OSError, ValueError):
        return None
    # By content, not mtime: a fresh clone's llama_run.cpp is newer than any build yet the same source.
    return runner if runner.is_file() and built_from == _source_digest() else None


def _source_digest() -> str:
    return hashlib.sha256(_SOURCE.read_bytes()).hexdigest()


def _run(cmd: Sequence[str], log_file: Path, cwd: Path | None = None) -> None:
    with log_file.open("a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.run(["nice", "-n", "19", *map(str, cmd)], cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        raise FlashMoeError(f"building llama.cpp failed ({cmd[0]} exit {proc.returncode}); log {log_file}:\n{tail}")


def build(version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int = 2, log: Callable[[str], None] = print) -> Path:
    """Download llama-cpp-python's sdist, build llama.cpp's library and llama-bench, compile
    flashmoe-llama-run; returns the runner's path (module docstring). Steps already done (source
    unpacked, build tree configured) are reused. Raises FlashMoeError naming the failing step and the
    log file (cache_dir()/build.log) when a tool (pip, cmake, ninja, g++) fails or is missing."""
    root = cache_dir(version)
    root.mkdir(parents=True, exist_ok=True)
    log_file = root / "build.log"
    for tool in ("cmake", "ninja", "g++"):
        if shutil.which(tool) is None:
            raise FlashMoeError(f"building llama.cpp needs {tool} on PATH")
    src, build_dir = root / "src", root / "build"
    t0 = time.perf_counter()
    if not (src / "CMakeLists.txt").exists():
        log(f"llama.cpp: downloading llama-cpp-python=={version} (source distribution) into {root}")
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                  f"llama-cpp-python=={version}", "-d", tmp], log_file)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                prefix = f"{sdist.name[: -len('.tar.gz')]}/vendor/llama.cpp/"
                members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
                for m in members:
                    m.name = m.name[len(prefix):]
                tar.extractall(Path(tmp) / "llama.cpp", members=[m for m in members if m.name], filter="data")
            shutil.rmtree(src, ignore_errors=True)
            os.replace(Path(tmp) / "llama.cpp", src)
    log(f"llama.cpp: building (cmake + ninja -j{jobs}, nice 19; ~15 min on 2 cores the first time), log {log_file}")
    _run(["cmake", "-S", src, "-B", build_dir, "-G", "Ninja", *_CMAKE_FLAGS], log_file)
    _run(["ninja", "-C", build_dir, f"-j{jobs}", "llama", "llama-bench"], log_file)
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy2(build_dir / "bin" / "llama-bench", root / "bin" / "llama-bench")
    runner = root / "bin" / RUNNER
    _run(["g++", "-O2", "-std=c++17", _SOURCE, "-I", src / "include", "-I", src / "ggml" / "include",
          *(build_dir / lib for lib in _LIBS), "-fopenmp", "-lpthread", "-ldl", "-o", runner], log_file)
    (root / "build.json").write_text(json.dumps({
        "llama_cpp_python": version, "cmake_flags": list(_CMAKE_FLAGS), "runner_source_sha256": _source_digest(),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": round(time.perf_counter() - t0, 1)}, indent=1) + "\n")
    log(f"llama.cpp: built in {time.perf_counter() - t0:.0f} s: {runner}")
    return runner


def find_or_build(version: str = LLAMA_CPP_PYTHON_VERSION, log: Callable[[str], None] = print) -> Path:
    """The cached runner (find_runner), building it first when absent (build)."""
    return find_runner(version) or build(version, log=log)


def drop_page_cache(path: Path) -> None:
    """Evict `path` from the page cache (POSIX_FADV_DONTNEED), so the next reader starts cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_llama(runner: Path, gguf: Path, threads: int, prompt: np.ndarray, decode: np.ndarray,
              passes: Sequence[str] = ("cold", "warm"), logits_out: Path | None = None,
              override: str | None = None, repack: bool = True,
              preexec: Callable[[], None] | None = None) -> dict:
    """Run flashmoe-llama-run once (module docstring); a result dict shaped like decode_run's for the
    fields both have: per pass `tok_s` (decode tokens ÷ their time; the prefill is excluded as in
    decode_run), `ms_per_token`, `ttft_s` (prefill), `decode_token_ms`; for the process `peak_rss_bytes`,
    `disk_read_bytes` (ru_inblock × 512, load and all passes), `wall_s`, `loadavg_1min` before/after.
    override: 'KEY=INT' metadata override (e.g. 'qwen3moe.expert_used_count=4').
    repack: llama.cpp's default, copying the Q4_0 weights into its repacked (interleaved) layout in
    anonymous memory at load — its fastest kernels, but memory for the whole model; False keeps every
    weight in the mmap'd file (llama-cli --no-repack), the only way it runs under a cap smaller than the model.
    Raises FlashMoeError with the runner's last output lines when it fails."""
    drop_page_cache(gguf)
    cmd = [str(runner), str(gguf), str(threads), str(len(passes)), str(logits_out or "-"),
           ",".join(map(str, prompt)), ",".join(map(str, decode))]
    cmd += ([] if repack else ["--no-repack"]) + ([override] if override else [])
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, preexec_fn=preexec)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join((stdout + stderr).strip().splitlines()[-6:])
        raise FlashMoeError(f"llama.cpp run on {gguf} failed (exit {proc.returncode}):\n{tail}")
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    result = {"engine": "llama.cpp", "gguf": str(gguf), "threads": threads, "prompt_tokens": len(prompt),
              "tokens": len(decode), "override": override, "repack": repack, "passes": {}, "wall_s": wall,
              "peak_rss_bytes": usage.ru_maxrss * 1024, "disk_read_bytes": usage.ru_inblock * 512,
              "loadavg_1min": [load_before, os.getloadavg()[0]]}
    for name, rec in zip(passes, records):
        ms = rec["token_ms"]
        result["passes"][name] = {"decode_tokens": len(ms), "tok_s": 1e3 * len(ms) / sum(ms) if ms else None,
                                  "ms_per_token": sum(ms) / len(ms) if ms else None,
                                  "ttft_s": rec["prefill_ms"] / 1e3, "decode_token_ms": ms}
    return result

