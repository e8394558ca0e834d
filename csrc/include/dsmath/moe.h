// Shared definitions of the MoE token permutation (csrc/moe_permute_cpu.cpp, csrc/moe_permute.cu): the
// contiguous-segment layout documented in python/dsmath_kernels/moe.py, its row count and the CUDA workspace.
#pragma once
#include <cstdint>

#include "dsmath/common.h"

namespace dsmath {
namespace moe {

constexpr int kMaxExperts = 1024;  // CUDA kernels keep per-warp expert counts in shared memory
constexpr int kThreads = 256;      // CUDA block size
constexpr int kItems = 4;          // pairs per thread: a block owns a chunk of kThreads * kItems pairs
constexpr int kChunk = kThreads * kItems;

DSM_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Rows of `order`: an upper bound on sum_e round_up(count_e, block_m) known without reading ids.
DSM_HD int64_t num_rows(int64_t P, int E, int block_m) { return P + min64(E, P) * (block_m - 1); }

DSM_HD int64_t num_chunks(int64_t P) { return (P + kChunk - 1) / kChunk; }

// CUDA workspace in int32 elements: a block-arrival counter, then per-chunk expert counts [chunks, E].
DSM_HD int64_t workspace_ints(int64_t P, int E) { return 1 + num_chunks(P) * E; }

DSM_HD int32_t round_up(int32_t v, int32_t m) { return (v + m - 1) / m * m; }

}  // namespace moe
}  // namespace dsmath
