// CUDA paged cache write: row n of src goes to cache slot slots[n] (block slot / BS, offset slot % BS); -1 skips.
// A slot outside [-1, num_slots) is skipped too and sets kBadSlot in `flags`: never a write out of bounds.
// One warp per row copying 16-bit / 32-bit words, 64-bit offsets, no host sync (CUDA-graph safe).
#include <cuda_runtime.h>

#include "dsmath/launchers.h"
#include "dsmath/cuda_status.cuh"

namespace dsmath {
namespace {

constexpr int kWarps = 8;

template <typename W>
__global__ void __launch_bounds__(kWarps * 32)
    cache_write_kernel(const W* __restrict__ src, int64_t src_s, W* __restrict__ cache, int64_t s_blk, int64_t s_tok,
                       int block_size, int64_t row, const void* __restrict__ slots, int slot64, int64_t N,
                       int64_t num_slots, int32_t* flags) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); n < N; n += warps) {
    const int64_t slot = slot64 ? static_cast<const int64_t*>(slots)[n] : static_cast<const int32_t*>(slots)[n];
    if (slot < 0 || slot >= num_slots) {
      if (slot != -1 && lane == 0) set_flag(flags, kBadSlot);
      continue;
    }
    const int64_t dst = (slot / block_size) * s_blk + (slot % block_size) * s_tok;
    for (int64_t i = lane; i < row; i += 32) cache[dst + i] = src[n * src_s + i];
  }
}

}  // namespace

int cache_write_cuda(const void* src, int64_t src_s, void* cache, int64_t s_blk, int64_t s_tok, int block_size,
                     int64_t row, int dtype, const void* slots, int slot_dtype, int64_t N, int64_t num_slots,
                     int32_t* flags, void* stream) {
  if (block_size < 1 || row < 1 || N < 0 || num_slots < 0 || (slot_dtype != kInt32 && slot_dtype != kInt64))
    return kBadArgument;
  if (N == 0) return kOk;
  const int64_t want = (N + kWarps - 1) / kWarps;
  const unsigned grid = static_cast<unsigned>(want < 65535 ? want : 65535);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int slot64 = slot_dtype == kInt64;
  if (dtype == kFloat32) {
    cache_write_kernel<<<grid, kWarps * 32, 0, st>>>(static_cast<const uint32_t*>(src), src_s,
                                                     static_cast<uint32_t*>(cache), s_blk, s_tok, block_size, row,
                                                     slots, slot64, N, num_slots, flags);
  } else if (dtype == kFloat16 || dtype == kBFloat16) {
    cache_write_kernel<<<grid, kWarps * 32, 0, st>>>(static_cast<const uint16_t*>(src), src_s,
                                                     static_cast<uint16_t*>(cache), s_blk, s_tok, block_size, row,
                                                     slots, slot64, N, num_slots, flags);
  } else if (dtype == kFloat64) {
    cache_write_kernel<<<grid, kWarps * 32, 0, st>>>(static_cast<const uint64_t*>(src), src_s,
                                                     static_cast<uint64_t*>(cache), s_blk, s_tok, block_size, row,
                                                     slots, slot64, N, num_slots, flags);
  } else {
    return kUnsupported;
  }
  return launch_status();
}

}  // namespace dsmath
