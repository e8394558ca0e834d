#!/usr/bin/env bash
# The one script a session with a GPU runs (DEVELOPERS.md): build for sm_90a without network, GPU tests, kernel
# benches, the headline throughput bench. Logs go to $OUT (or a temp dir); a summary line per step goes to
# $OUT/summary.txt. Budget: under 8 minutes on an H200. Steps keep going after a failure so one run shows all.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export DSMATH_CUDA_ARCHS="${DSMATH_CUDA_ARCHS:-90a}"

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" >> "$SUMMARY"
  tail -n 3 "$OUT/$name.log" | sed "s/^/  [$name] /" >> "$SUMMARY"
  return 0
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# Worst case (every step hitting its limit) is 500 s; expected ~5-6 min on an H200 with 16 cores.
step build 110 pip install --no-build-isolation --no-deps -v .
step env 5 python -m dsmath_kernels
step pytest_gpu 110 python -m pytest -m gpu -q -p no:cacheprovider tests
step throughput 80 python bench/throughput.py --requests 64 --rollout-prompts 4 --rollout-tokens 256 \
  --long-prompt 32768 --baseline-seconds 10 --time-cap 12 --json "$OUT/throughput.json"
step bench_route_topk 15 python bench/bench_route_topk.py
step bench_attention 55 python bench/bench_attention.py  # + Triton compiles of the tiled decode kernels
step bench_moe 35 python bench/bench_moe.py --tokens 1,128,8192 --backward-max-t 8192
step bench_grpo_loss 30 python bench/bench_grpo_loss.py --tokens 8192
step bench_fp8 25 python bench/bench_fp8.py --tokens 1,64,4096 --reps 5
step bench_model 60 python bench/bench_model.py --tokens 4096 --layers 2 --reps 1
echo "total ${SECONDS}s" >> "$SUMMARY"
cat "$SUMMARY"
