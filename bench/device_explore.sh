#!/bin/bash
# Issue 14 exploration on a many-core machine (docs/benchmarks.md, "Every core"): decode of a 4-layer
# Qwen3-30B-A3B-shaped model at 16, 8 and 1 numba threads under libgomp spin settings and reader-thread
# counts. Run from the repository root of a checkout that is not pip-installed (the device machine):
#   OUT=/tmp/out bash bench/device_explore.sh [WHEEL_DIR]
# WHEEL_DIR: wheels of the dependencies the machine lacks (typer, rich, ml_dtypes, gguf), installed offline.
set -u
ROOT=$PWD
for d in backends reference conformance bench shaders; do ln -sfn ../$d flashmoe/$d; done  # the package layout
if [ $# -gt 0 ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site "$1"/*.whl; fi
export PYTHONPATH=$ROOT:/tmp/site PYTHONUNBUFFERED=1
lscpu | grep -E "Model name|^CPU\(s\)|Thread"
[ -d /tmp/q30 ] || python3 -c "
from flashmoe.convert.synth import synth_model
from flashmoe.arch.presets import get_preset
synth_model('/tmp/q30', get_preset('qwen3-30b-a3b').config_dict(4), tokenizer=None)" || exit 4
run() { # LABEL ENV... -- DECODE_RUN_ARGS...
  L=$1; shift; E=(); while [ "$1" != "--" ]; do E+=("$1"); shift; done; shift
  env "${E[@]}" python3 -m flashmoe.bench.decode_run --model /tmp/q30 --io pagecache --prompt-tokens 4 --tokens 12 \
    --passes cold,warm --activations q8 --json "$OUT/$L.json" "$@" > /dev/null 2> "$OUT/$L.err" || tail -3 "$OUT/$L.err"
  python3 -c "
import json; w = json.load(open('$OUT/$L.json'))['passes']['warm']
print('$L', round(w['tok_s'], 2), 'tok/s; ms/token', round(w['ms_per_token'], 1), 'compute', round(w['compute_ms_per_token'], 1),
      'io', round(w['io_wait_ms_per_token'], 1), {k: round(v, 2) for k, v in w['stage_ms_per_token'].items()})"
}
run compile NUMBA_NUM_THREADS=16 -- --tokens 2  # numba compiles and caches its kernels once
for t in 16 8; do
  for s in 300000 0 2000 20000; do run "t${t}_spin$s" NUMBA_NUM_THREADS=$t GOMP_SPINCOUNT=$s --; done
done
run t16_spin2000_io2 NUMBA_NUM_THREADS=16 GOMP_SPINCOUNT=2000 -- --io-threads 2
run t16_spin2000_io4 NUMBA_NUM_THREADS=16 GOMP_SPINCOUNT=2000 -- --io-threads 4
run t16_spin300000_io4 NUMBA_NUM_THREADS=16 GOMP_SPINCOUNT=300000 -- --io-threads 4
run t1 NUMBA_NUM_THREADS=1 --
run t1_io2 NUMBA_NUM_THREADS=1 -- --io-threads 2
