// Top-k expert routing: the selection math shared by the CPU kernel (route_topk_cpu.cpp) and the CUDA kernel
// (route_topk.cu). Everything here is __host__ __device__ so both builds run the same comparisons and rounding.
//
// Semantics (python/dsmath_kernels/reference/routing.py is the readable spec):
//   scores  = softmax(logits) | sigmoid(logits)            fp32, [E]
//   choice  = scores + bias (sigmoid with bias) | scores    what selection ranks
//   groups  (n_group > 1): group score = max(choice in group) for softmax, sum of the group's top-2 for sigmoid;
//           keep the topk_group best groups, experts of other groups are not eligible
//   ids     = the top_k eligible experts by choice; weights = scores[ids]
//   order   : each row sorted by descending weight, ties by lower expert id
//   weights : / (sum + 1e-20) when renormalize, then * routed_scaling_factor
// NaN: a NaN score ranks below every number (including -inf); ids stay in range, NaN weights propagate.
// Replay (route_topk_weights): ids given by the caller, weights = the same scores at those ids, renormalized and
// scaled as above (bit-identical to route_topk's weights for the same experts on the same backend).
#pragma once
#include <cmath>
#include "dsmath/common.h"

namespace dsmath {
namespace routing {

constexpr int kMaxExperts = 512;
constexpr int kMaxTopK = 16;
constexpr int kMaxGroups = 32;
enum Scoring : int { kSoftmax = 0, kSigmoid = 1 };

struct Params {
  int64_t T;            // tokens
  int E;                // experts
  int K;                // top_k
  int n_group;          // expert groups (1 = no grouping)
  int topk_group;       // groups kept
  int scoring;          // Scoring
  int renormalize;      // bool
  float scale;          // routed_scaling_factor
};

// Launcher checks (CPU and CUDA, selection and replay): the sizes the kernels handle, whole groups, and top_k within
// the experts of the kept groups (a larger top_k would make the selection index past the eligible experts). Replay
// passes n_group = topk_group = 1.
DSM_HD bool params_ok(const Params& p) {
  if (p.T < 0 || p.E < 1 || p.E > kMaxExperts || p.K < 1 || p.K > kMaxTopK || p.n_group < 1 ||
      p.n_group > kMaxGroups || p.E % p.n_group || p.topk_group < 1 || p.topk_group > p.n_group)
    return false;
  if (p.scoring != kSoftmax && p.scoring != kSigmoid) return false;
  if (p.n_group > 1 && p.scoring == kSigmoid && p.E / p.n_group < 2) return false;
  return p.K <= p.topk_group * (p.E / p.n_group);
}

// NaN ranks lowest: map it below -inf by treating it as -inf and relying on the index tie-break.
DSM_HD float rank_key(float x) { return x != x ? -INFINITY : x; }

// True when (a, ia) ranks strictly before (b, ib): larger value first, then lower index.
DSM_HD bool better(float a, int ia, float b, int ib) {
  a = rank_key(a);
  b = rank_key(b);
  return a > b || (a == b && ia < ib);
}

DSM_HD float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

// Score of one expert group from its choice values [begin, begin + size).
DSM_HD float group_score(const float* choice, int begin, int size, int scoring) {
  if (scoring == kSoftmax) {
    float m = -INFINITY;
    for (int i = 0; i < size; ++i) m = fmaxf(m, rank_key(choice[begin + i]));
    return m;
  }
  // sum of the two largest (DeepSeek-V3)
  float b1 = -INFINITY, b2 = -INFINITY;
  for (int i = 0; i < size; ++i) {
    float v = rank_key(choice[begin + i]);
    if (v > b1) {
      b2 = b1;
      b1 = v;
    } else if (v > b2) {
      b2 = v;
    }
  }
  return b1 + b2;
}

// Sort K (weight, id) pairs by descending weight (ties: lower id); insertion sort, K <= 16.
DSM_HD void sort_pairs(float* w, int* ids, int K) {
  for (int i = 1; i < K; ++i) {
    float wv = w[i];
    int iv = ids[i];
    int j = i - 1;
    while (j >= 0 && better(wv, iv, w[j], ids[j])) {
      w[j + 1] = w[j];
      ids[j + 1] = ids[j];
      --j;
    }
    w[j + 1] = wv;
    ids[j + 1] = iv;
  }
}

// Renormalize (w / (sum + 1e-20)) when asked, then scale: one weight (finalize_one; the CUDA kernels apply it per
// lane) or K weights in place (finalize). `sum` must be the weights' sum in descending-weight order (ties: lower id;
// equal pairs in the given order, as the stable sort_pairs leaves them) — the order route_topk's rows come out in —
// so the same experts get bit-identical weights whether route_topk picked them or a caller hands them over in any
// order (replay).
DSM_HD float finalize_one(float w, int renormalize, float sum, float scale) {
  if (renormalize) w = w / (sum + 1e-20f);
  return w * scale;
}

DSM_HD void finalize(float* w, int K, int renormalize, float sum, float scale) {
  for (int i = 0; i < K; ++i) w[i] = finalize_one(w[i], renormalize, sum, scale);
}

// Sum of K weights in descending-weight order (ties: lower id), whatever order they are given in.
DSM_HD float sorted_sum(const float* w, const int* ids, int K) {
  float sw[kMaxTopK];
  int si[kMaxTopK];
  for (int i = 0; i < K; ++i) {
    sw[i] = w[i];
    si[i] = ids[i];
  }
  sort_pairs(sw, si, K);
  float s = 0.f;
  for (int i = 0; i < K; ++i) s += sw[i];
  return s;
}

// Sort the K chosen (weight, id) pairs by descending weight (ties: lower id), then renormalize and scale.
DSM_HD void sort_and_finalize(float* w, int* ids, int K, int renormalize, float scale) {
  sort_pairs(w, ids, K);
  float s = 0.f;
  for (int i = 0; i < K; ++i) s += w[i];
  finalize(w, K, renormalize, s, scale);
}

// fp32 scores of one row: softmax(logits) or sigmoid(logits), written to scores[0, E). Serial; the CUDA kernels
// compute the same with a warp (warp_scores in route_topk.cu).
DSM_HD void row_scores(const void* logits, int64_t row_offset, int dtype, int E, int scoring, float* scores) {
  if (scoring == kSoftmax) {
    // A NaN logit is skipped by fmaxf but makes exp() and the sum NaN: the whole row's weights become NaN.
    float m = -INFINITY;
    for (int e = 0; e < E; ++e) {
      float x = load_as_float(logits, row_offset + e, dtype);
      scores[e] = x;
      m = fmaxf(m, x);
    }
    float s = 0.f;
    for (int e = 0; e < E; ++e) {
      scores[e] = expf(scores[e] - m);
      s += scores[e];
    }
    for (int e = 0; e < E; ++e) scores[e] = scores[e] / s;
  } else {
    for (int e = 0; e < E; ++e) scores[e] = sigmoidf(load_as_float(logits, row_offset + e, dtype));
  }
}

// Gating weights of K given experts (routing replay): scores[ids], renormalized and scaled exactly as route_row
// does for the experts it picks, in the caller's order. An id outside [0, E) is never read: it makes the row's
// weights NaN (the Python op refuses such ids before a kernel runs, where it can check without a device sync).
DSM_HD void weights_for_ids(const float* scores, const int* ids, const Params& p, float* out_w) {
  bool bad = false;
  for (int k = 0; k < p.K; ++k) {
    const int e = ids[k];
    const bool ok = e >= 0 && e < p.E;
    bad = bad || !ok;
    out_w[k] = ok ? scores[e] : NAN;
  }
  finalize(out_w, p.K, p.renormalize, p.renormalize ? sorted_sum(out_w, ids, p.K) : 0.f, p.scale);
  if (bad)
    for (int k = 0; k < p.K; ++k) out_w[k] = NAN;
}

// Serial routing of one row. `scores` and `choice` are [E] scratch buffers; logits row is read with its dtype.
// Used by the CPU kernel; the CUDA kernel runs the same steps with a warp (see route_topk.cu).
DSM_HD void route_row(const void* logits, int64_t row_offset, int dtype, const float* bias, const Params& p,
                      float* scores, float* choice, float* out_w, int* out_ids) {
  const int E = p.E;
  row_scores(logits, row_offset, dtype, E, p.scoring, scores);
  for (int e = 0; e < E; ++e) choice[e] = bias ? scores[e] + bias[e] : scores[e];

  // group mask (bit g set = group g eligible)
  uint32_t group_ok = 0xffffffffu;
  int gs = E;
  if (p.n_group > 1) {
    gs = E / p.n_group;
    float gscore[kMaxGroups];
    for (int g = 0; g < p.n_group; ++g) gscore[g] = group_score(choice, g * gs, gs, p.scoring);
    group_ok = 0u;
    for (int r = 0; r < p.topk_group; ++r) {
      int best = -1;
      for (int g = 0; g < p.n_group; ++g) {
        if (group_ok & (1u << g)) continue;
        if (best < 0 || better(gscore[g], g, gscore[best], best)) best = g;
      }
      group_ok |= (1u << best);
    }
  }
  // top-k in one pass: keep the K best (by `better`, a strict total order) in a sorted buffer. The CUDA kernel
  // takes K rounds of warp argmax instead; the same total order makes both pick the same set.
  float best_v[kMaxTopK];
  int n = 0;
  for (int e = 0; e < E; ++e) {
    if (p.n_group > 1 && !(group_ok & (1u << (e / gs)))) continue;
    float v = choice[e];
    if (n == p.K && !better(v, e, best_v[n - 1], out_ids[n - 1])) continue;
    int j = n < p.K ? n++ : n - 1;
    while (j > 0 && better(v, e, best_v[j - 1], out_ids[j - 1])) {
      best_v[j] = best_v[j - 1];
      out_ids[j] = out_ids[j - 1];
      --j;
    }
    best_v[j] = v;
    out_ids[j] = e;
  }
  for (int k = 0; k < p.K; ++k) out_w[k] = scores[out_ids[k]];
  sort_and_finalize(out_w, out_ids, p.K, p.renormalize, p.scale);
}

}  // namespace routing
}  // namespace dsmath
