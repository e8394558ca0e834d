// CUDA token permutation for the MoE expert layer (layout: python/dsmath_kernels/moe.py). Two kernels, no host
// sync, CUDA-graph safe (fixed grid from P, workspace allocated by the caller, counters reset by a memset node):
//  1. count: each block histograms its chunk of kChunk pairs in shared memory and writes counts[chunk][e];
//     the last block to finish (arrival counter) turns them into per-chunk bases (exclusive scan over chunks)
//     and writes the block_m-padded expert_offsets.
//  2. scatter: each block re-reads its chunk and places every pair at offsets[e] + base[chunk][e] + its rank
//     among the earlier pairs of the same expert in the chunk (warp __match_any_sync + per-warp counts), so the
//     result is stable, deterministic and identical to the CPU path.
// Ids outside [0, E) are skipped (inverse = -1, flag kBadExpertId) so a bad id can never write out of bounds.
#include <cuda_runtime.h>

#include "dsmath/launchers.h"
#include "dsmath/moe.h"
#include "dsmath/cuda_status.cuh"

namespace dsmath {
namespace {

using moe::kChunk;
using moe::kItems;
using moe::kThreads;
constexpr int kWarps = kThreads / 32;

__global__ void __launch_bounds__(kThreads)
    permute_count_kernel(const int32_t* __restrict__ ids, int64_t P, int E, int block_m, int32_t* __restrict__ ws,
                         int32_t* __restrict__ offsets, int32_t* flags) {
  extern __shared__ int32_t smem[];  // hist [E]
  __shared__ bool is_last;
  int32_t* hist = smem;
  unsigned int* arrived = reinterpret_cast<unsigned int*>(ws);
  int32_t* counts = ws + 1;  // [chunks, E]
  for (int e = threadIdx.x; e < E; e += kThreads) hist[e] = 0;
  __syncthreads();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kChunk;
  for (int i = 0; i < kItems; ++i) {
    const int64_t f = base + i * kThreads + threadIdx.x;
    if (f < P) {
      const int32_t e = ids[f];
      if (e >= 0 && e < E) atomicAdd(&hist[e], 1);
      else set_flag(flags, kBadExpertId);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kThreads) counts[static_cast<int64_t>(blockIdx.x) * E + e] = hist[e];
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(arrived, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;

  // Last block: exclusive scan over chunks per expert (bases relative to the expert's segment), totals to smem.
  const int chunks = gridDim.x;
  constexpr int kBatch = 8;  // loads in flight per thread: the chunk walk is latency bound
  for (int e = threadIdx.x; e < E; e += kThreads) {
    int32_t run = 0;
    for (int c0 = 0; c0 < chunks; c0 += kBatch) {
      int32_t v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        v[u] = c0 + u < chunks ? __ldcg(counts + static_cast<int64_t>(c0 + u) * E + e) : 0;
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (c0 + u < chunks) counts[static_cast<int64_t>(c0 + u) * E + e] = run;
        run += v[u];
      }
    }
    hist[e] = run;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t run = 0;
    for (int e = 0; e < E; ++e) {
      offsets[e] = run;
      run += moe::round_up(hist[e], block_m);
    }
    offsets[E] = run;
  }
}

__global__ void __launch_bounds__(kThreads)
    permute_scatter_kernel(const int32_t* __restrict__ ids, int64_t P, int E, const int32_t* __restrict__ ws,
                           const int32_t* __restrict__ offsets, int32_t* __restrict__ order,
                           int32_t* __restrict__ inverse) {
  extern __shared__ int32_t smem[];  // run [E], wcount [kWarps, E]
  int32_t* run = smem;
  int32_t* wcount = smem + E;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int32_t* bases = ws + 1 + static_cast<int64_t>(blockIdx.x) * E;
  for (int e = threadIdx.x; e < E; e += kThreads) run[e] = offsets[e] + bases[e];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kChunk;
  const unsigned lt_mask = (1u << lane) - 1u;
  for (int i = 0; i < kItems; ++i) {
    for (int j = threadIdx.x; j < kWarps * E; j += kThreads) wcount[j] = 0;
    __syncthreads();
    const int64_t f = base + i * kThreads + threadIdx.x;
    int32_t e = f < P ? ids[f] : -1;
    const bool ok = e >= 0 && e < E;
    if (!ok) e = -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & lt_mask);
    if (ok && rank == 0) wcount[warp * E + e] = __popc(peers);
    __syncthreads();
    if (ok) {
      int32_t pos = run[e] + rank;
      for (int w = 0; w < warp; ++w) pos += wcount[w * E + e];
      order[pos] = static_cast<int32_t>(f);
      inverse[f] = pos;
    } else if (f < P) {
      inverse[f] = -1;
    }
    __syncthreads();
    for (int e2 = threadIdx.x; e2 < E; e2 += kThreads) {
      int32_t add = 0;
      for (int w = 0; w < kWarps; ++w) add += wcount[w * E + e2];
      run[e2] += add;
    }
    __syncthreads();
  }
}

}  // namespace

int moe_permute_cuda(const int32_t* ids, int64_t P, int E, int block_m, int32_t* order, int32_t* offsets,
                     int32_t* inverse, int32_t* workspace, int32_t* flags, void* stream) {
  if (P < 0 || E < 1 || E > moe::kMaxExperts || block_m < 1) return kBadArgument;
  const int64_t R = moe::num_rows(P, E, block_m);
  if (R > INT32_MAX) return kUnsupported;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  if (P == 0) {
    err = cudaMemsetAsync(offsets, 0, sizeof(int32_t) * (E + 1), s);
    return err == cudaSuccess ? kOk : cuda_status(err);
  }
  const int64_t chunks = moe::num_chunks(P);
  if (chunks > INT32_MAX) return kUnsupported;
  if ((err = cudaMemsetAsync(workspace, 0, sizeof(int32_t), s)) != cudaSuccess) return cuda_status(err);
  if ((err = cudaMemsetAsync(order, 0xff, sizeof(int32_t) * R, s)) != cudaSuccess) return cuda_status(err);  // -1
  const size_t smem1 = sizeof(int32_t) * E, smem2 = sizeof(int32_t) * E * (1 + kWarps);
  permute_count_kernel<<<static_cast<unsigned>(chunks), kThreads, smem1, s>>>(ids, P, E, block_m, workspace,
                                                                              offsets, flags);
  if ((err = cudaGetLastError()) != cudaSuccess) return cuda_status(err);
  if (smem2 > 48 * 1024) {
    err = cudaFuncSetAttribute(permute_scatter_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem2));
    if (err != cudaSuccess) return cuda_status(err);
  }
  permute_scatter_kernel<<<static_cast<unsigned>(chunks), kThreads, smem2, s>>>(ids, P, E, workspace, offsets,
                                                                                order, inverse);
  if ((err = cudaGetLastError()) != cudaSuccess) return cuda_status(err);
  return kOk;
}

}  // namespace dsmath
