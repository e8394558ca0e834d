// CUDA kernels for route_topk: one warp per token row, scores in shared memory, selection by repeated warp argmax
// with the comparator and group math of dsmath/routing.h. One launch, no host sync, CUDA-graph safe.
// route_weights_kernel (routing replay): the same scores, then the weights of caller-given ids.
#include <cuda_runtime.h>

#include "dsmath/launchers.h"
#include "dsmath/routing.h"
#include "dsmath/cuda_status.cuh"

namespace dsmath {
namespace {

constexpr int kWarps = 4;
constexpr int kPerLane = routing::kMaxExperts / 32;  // 16 experts per lane at E = 512

struct ArgBest {
  float v;
  int i;
};

__device__ __forceinline__ ArgBest warp_argbest(ArgBest a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    float ov = __shfl_xor_sync(0xffffffffu, a.v, off);
    int oi = __shfl_xor_sync(0xffffffffu, a.i, off);
    // lanes holding no candidate carry i = INT_MAX and never win
    if (oi != 0x7fffffff && (a.i == 0x7fffffff || routing::better(ov, oi, a.v, a.i))) {
      a.v = ov;
      a.i = oi;
    }
  }
  return a;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Stable rank of this lane's (w, id) among lanes [0, K): the number of pairs that sort before it (descending weight,
// ties lower id, equal pairs in lane order) — the position routing::sort_pairs (a stable insertion sort) gives it.
// Every lane must call it (K uniform); the answer of a lane >= K is meaningless.
__device__ __forceinline__ int warp_rank(float w, int id, int lane, int K) {
  int r = 0;
  for (int j = 0; j < K; ++j) {
    const float wj = __shfl_sync(0xffffffffu, w, j);
    const int ij = __shfl_sync(0xffffffffu, id, j);
    if (j != lane && (routing::better(wj, ij, w, id) || (j < lane && !routing::better(w, id, wj, ij)))) ++r;
  }
  return r;
}

// Sum of the weights of lanes [0, K) in rank order, 0.f + w(rank 0) + w(rank 1) + ...: the rounding of
// routing::sorted_sum / sort_and_finalize. Lanes >= K must carry a rank >= K. Every lane must call it.
__device__ __forceinline__ float warp_sorted_sum(float w, int rank, int K) {
  float s = 0.f;
  for (int r = 0; r < K; ++r) s += __shfl_sync(0xffffffffu, w, __ffs(__ballot_sync(0xffffffffu, rank == r)) - 1);
  return s;
}

// Scores of row `row` into lane registers x[j] (expert lane + 32 j; 0 / -inf beyond E): softmax or sigmoid in
// fp32, the same steps and warp reductions for route_topk and route_topk_weights, so both see the same bits.
__device__ __forceinline__ void warp_scores(const void* __restrict__ logits, int64_t row, int dtype, int E,
                                            int scoring, int lane, float (&x)[kPerLane]) {
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    int e = lane + 32 * j;
    x[j] = e < E ? load_as_float(logits, row + e, dtype) : -INFINITY;
    m = fmaxf(m, x[j]);
  }
  if (scoring == routing::kSoftmax) {
    m = warp_max(m);
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      int e = lane + 32 * j;
      x[j] = e < E ? expf(x[j] - m) : 0.f;
      s += x[j];
    }
    s = warp_sum(s);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) x[j] = x[j] / s;
  } else {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) x[j] = routing::sigmoidf(x[j]);
  }
}

__global__ void __launch_bounds__(kWarps * 32)
    route_topk_kernel(const void* __restrict__ logits, int dtype, int64_t stride_t, const float* __restrict__ bias,
                      routing::Params p, float* __restrict__ weights, int32_t* __restrict__ ids) {
  __shared__ float s_scores[kWarps][routing::kMaxExperts];
  __shared__ float s_choice[kWarps][routing::kMaxExperts];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= p.T) return;  // whole warp exits together
  const int E = p.E;
  float* scores = s_scores[warp];
  float* choice = s_choice[warp];

  // 1. scores in fp32
  float x[kPerLane];
  warp_scores(logits, t * stride_t, dtype, E, p.scoring, lane, x);
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    int e = lane + 32 * j;
    if (e < E) {
      scores[e] = x[j];
      choice[e] = bias ? x[j] + bias[e] : x[j];
    }
  }
  __syncwarp();

  // 2. group selection: lane g scores group g, then topk_group rounds of warp argmax
  uint32_t group_ok = 0xffffffffu;
  int gs = E;
  if (p.n_group > 1) {
    gs = E / p.n_group;
    ArgBest mine{-INFINITY, 0x7fffffff};
    if (lane < p.n_group) mine = ArgBest{routing::group_score(choice, lane * gs, gs, p.scoring), lane};
    group_ok = 0u;
    for (int r = 0; r < p.topk_group; ++r) {
      ArgBest cand = (mine.i != 0x7fffffff && !(group_ok & (1u << lane))) ? mine : ArgBest{-INFINITY, 0x7fffffff};
      ArgBest best = warp_argbest(cand);
      group_ok |= 1u << best.i;
    }
  }

  // 3. top-k: each lane keeps its best untaken eligible expert, warp argmax picks the winner; lane k keeps pick k
  // (no per-thread arrays: nothing in local memory)
  uint32_t taken = 0u;  // bit j: expert lane + 32 j already chosen
  float my_w = 0.f;
  int my_i = 0;
  for (int k = 0; k < p.K; ++k) {
    ArgBest cand{-INFINITY, 0x7fffffff};
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      int e = lane + 32 * j;
      if (e >= E || (taken & (1u << j))) continue;
      if (p.n_group > 1 && !(group_ok & (1u << (e / gs)))) continue;
      float c = choice[e];
      if (cand.i == 0x7fffffff || routing::better(c, e, cand.v, cand.i)) cand = ArgBest{c, e};
    }
    ArgBest best = warp_argbest(cand);
    if ((best.i & 31) == lane) taken |= 1u << (best.i >> 5);
    if (lane == k) {
      my_i = best.i;
      my_w = scores[best.i];
    }
  }
  // 4. sort by weight (routing::sort_and_finalize's order), renormalize, scale: lane k writes its pick at its rank
  int rank = warp_rank(my_w, my_i, lane, p.K);
  if (lane >= p.K) rank = 32;
  const float sum = p.renormalize ? warp_sorted_sum(my_w, rank, p.K) : 0.f;
  if (lane < p.K) {
    weights[t * p.K + rank] = routing::finalize_one(my_w, p.renormalize, sum, p.scale);
    ids[t * p.K + rank] = my_i;
  }
}

// Replay: one warp per row computes the scores as route_topk_kernel does; lane k takes the score of the k-th given id
// and the warp renormalizes / scales them as routing::weights_for_ids (the CPU kernel's function) does: sum in
// sorted order, a bad id makes the row NaN.
// min blocks 1: with the bare thread bound ptxas keeps this kernel at 40 registers and spills one value across the
// division slow-path calls of the softmax (8 B of local memory); with it, 45 registers and no local memory.
__global__ void __launch_bounds__(kWarps * 32, 1)
    route_weights_kernel(const void* __restrict__ logits, int dtype, int64_t stride_t,
                         const int32_t* __restrict__ ids, routing::Params p, float* __restrict__ weights) {
  __shared__ float s_scores[kWarps][routing::kMaxExperts];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= p.T) return;  // whole warp exits together
  float* scores = s_scores[warp];
  float x[kPerLane];
  warp_scores(logits, t * stride_t, dtype, p.E, p.scoring, lane, x);
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    int e = lane + 32 * j;
    if (e < p.E) scores[e] = x[j];
  }
  __syncwarp();
  const int id = lane < p.K ? ids[t * p.K + lane] : 0;
  const bool ok = id >= 0 && id < p.E;
  const float w = lane < p.K ? (ok ? scores[id] : NAN) : 0.f;
  const bool bad = __any_sync(0xffffffffu, !ok);  // lanes >= K hold id 0: ok
  int rank = warp_rank(w, id, lane, p.K);
  if (lane >= p.K) rank = 32;
  const float sum = p.renormalize ? warp_sorted_sum(w, rank, p.K) : 0.f;
  if (lane < p.K) weights[t * p.K + lane] = bad ? NAN : routing::finalize_one(w, p.renormalize, sum, p.scale);
}

}  // namespace

int route_topk_cuda(const void* logits, int dtype, int64_t stride_t, const float* bias, const routing::Params& p,
                    float* weights, int32_t* ids, void* stream) {
  if (!routing::params_ok(p)) return kBadArgument;
  if (p.T == 0) return kOk;
  const int64_t blocks = (p.T + kWarps - 1) / kWarps;
  route_topk_kernel<<<static_cast<unsigned>(blocks), kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(
      logits, dtype, stride_t, bias, p, weights, ids);
  return launch_status();
}

int route_weights_cuda(const void* logits, int dtype, int64_t stride_t, const int32_t* ids,
                       const routing::Params& p, float* weights, void* stream) {
  if (!routing::params_ok(p)) return kBadArgument;
  if (p.T == 0) return kOk;
  const int64_t blocks = (p.T + kWarps - 1) / kWarps;
  route_weights_kernel<<<static_cast<unsigned>(blocks), kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(
      logits, dtype, stride_t, ids, p, weights);
  return launch_status();
}

}  // namespace dsmath
