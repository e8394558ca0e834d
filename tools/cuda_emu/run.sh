#!/usr/bin/env bash
# CPU emulation of the CUDA decode kernel (no GPU needed): csrc/attn_decode.cu is compiled by g++ with the shims
# of emu.h (one std::thread per CUDA thread, barriers for __syncthreads and warp shuffles) and its output compared
# with the C++ CPU kernel on GQA / MHA / MLA configurations, split plans, ragged and empty sequences, fp32 / fp16 /
# bf16; attn_cache.cu's cache write against the expected cache. Checks the kernels' indexing and the lane-group /
# warp / split merges; not speed or memory alignment.
# Usage: tools/cuda_emu/run.sh   (~30 s compile + ~1 min run on 2 cores)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="$(mktemp -d)"
mkdir -p "$work/fake" && touch "$work/fake/cuda_runtime.h" "$work/fake/cuda_fp16.h"
# kernel<<<grid, block, smem, stream>>>(args); -> emu::launch(grid, block, smem, stream, <call kernel>, args);
for f in attn_decode attn_cache; do
  perl -0pe 's/(\w+(?:<[^<>]*>)?)<<<(.*?)>>>\((.*?)\);/emu::launch($2, [](auto... a) { $1(a...); }, $3);/gs' "$root/csrc/$f.cu" \
    > "$work/${f}_emu.cu"
done
printf '#include "emu.h"\n#include "dsmath/common.h"\n#include "attn_cache_emu.cu"\n' > "$work/cache_tu.cpp"
g++ -std=c++20 -O1 -pthread -I"$root/csrc/include" -I"$work/fake" -I"$work" -I"$here" "$here/harness.cpp" \
  "$work/cache_tu.cpp" "$root/csrc/attn_decode_cpu.cpp" -o "$work/harness"
"$work/harness"
