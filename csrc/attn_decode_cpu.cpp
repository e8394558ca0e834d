// CPU paged decode (GQA/MQA and absorbed MLA): the split-KV plan of the CUDA kernel, run by std::threads. Work
// item = (sequence, kv head, split): the G = Hq / Hkv query heads of one kv head stream the split's tokens once,
// with the online softmax and log-sum-exp merge of dsmath/attention.h (the same math as attn_decode.cu).
#include <algorithm>
#include <vector>

#include "dsmath/attention.h"
#include "dsmath/cpu_parallel.h"
#include "dsmath/launchers.h"

namespace dsmath {
namespace {

using attn::DecodeParams;

// Dot product with 8 independent partial sums (vectorisable without -ffast-math).
inline float dot(const float* a, const float* b, int n) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int d = 0;
  for (; d + 8 <= n; d += 8)
    for (int i = 0; i < 8; ++i) part[i] += a[d + i] * b[d + i];
  float s = 0.f;
  for (; d < n; ++d) s += a[d] * b[d];
  for (int i = 0; i < 8; ++i) s += part[i];
  return s;
}

template <int DT>
void decode_item(const DecodeParams& p, int b, int kvh, int s, std::vector<float>& buf) {
  const int G = p.Hq / p.Hkv, D = p.D, Dv = p.Dv;
  buf.assign(static_cast<size_t>(G) * (D + Dv + 2) + D + Dv, 0.f);
  float* q = buf.data();            // [G, D], pre-scaled into the log2 domain
  float* acc = q + G * D;           // [G, Dv]
  float* m = acc + G * Dv;          // [G]
  float* l = m + G;                 // [G]
  float* krow = l + G;              // [D]
  float* vrow = krow + D;           // [Dv]
  const float qs = p.scale * attn::kLog2e;
  for (int g = 0; g < G; ++g) {
    const int64_t qo = b * p.q_sb + static_cast<int64_t>(kvh * G + g) * p.q_sh;
    for (int d = 0; d < D; ++d) q[g * D + d] = attn::load_t<DT>(p.q, qo + d) * qs;
    m[g] = -INFINITY;
  }
  int64_t begin, end;
  attn::split_range(s, p.num_splits, p.chunk, attn::checked_len(p, b), begin, end);
  const int32_t* bt = p.block_tables + b * p.bt_sb;
  const attn::BlockDiv div(p.block_size);
  for (int64_t t = begin; t < end; ++t) {
    int64_t off;
    const int64_t blk = attn::token_block(bt, t, div, off);
    if (!attn::block_ok(blk, p)) continue;  // a bad id is an absent token (and a flag): never a wild read
    const int64_t ko = blk * p.k_sblk + off * p.k_stok + kvh * p.k_sh;
    const int64_t vo = blk * p.v_sblk + off * p.v_stok + kvh * p.v_sh;
    for (int d = 0; d < D; ++d) krow[d] = attn::load_t<DT>(p.k, ko + d);
    for (int d = 0; d < Dv; ++d) vrow[d] = attn::load_t<DT>(p.v, vo + d);
    for (int g = 0; g < G; ++g) {
      const float sc = dot(q + g * D, krow, D);
      float alpha, w;
      attn::online_update(m[g], l[g], sc, alpha, w);
      float* a = acc + g * Dv;
      for (int d = 0; d < Dv; ++d) a[d] = a[d] * alpha + w * vrow[d];
    }
  }
  for (int g = 0; g < G; ++g) {
    const int h = kvh * G + g;
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    if (p.num_splits == 1) {
      for (int d = 0; d < Dv; ++d)
        attn::store_from_float(p.out, (static_cast<int64_t>(b) * p.Hq + h) * Dv + d, acc[g * Dv + d] * inv, p.dtype);
    } else {
      const int64_t row = (static_cast<int64_t>(b) * p.Hq + h) * p.num_splits + s;
      for (int d = 0; d < Dv; ++d) p.part_o[row * Dv + d] = acc[g * Dv + d] * inv;
      p.part_lse[row] = attn::state_lse(m[g], l[g]);
    }
  }
}

void merge_item(const DecodeParams& p, int64_t bh) {
  const int S = p.num_splits;
  const float* o = p.part_o + bh * S * p.Dv;
  const float* lse = p.part_lse + bh * S;
  for (int d = 0; d < p.Dv; ++d)
    attn::store_from_float(p.out, bh * p.Dv + d, attn::merge_splits(o + d, p.Dv, lse, S), p.dtype);
}

template <int DT>
void decode_all(const DecodeParams& p, int num_threads) {
  const int64_t items = static_cast<int64_t>(p.B) * p.Hkv * p.num_splits;
  cpu::parallel_for(items, num_threads, [&](int64_t i) {
    thread_local std::vector<float> buf;
    const int s = static_cast<int>(i % p.num_splits);
    const int kvh = static_cast<int>((i / p.num_splits) % p.Hkv);
    const int b = static_cast<int>(i / (static_cast<int64_t>(p.num_splits) * p.Hkv));
    decode_item<DT>(p, b, kvh, s, buf);
  });
  if (p.num_splits > 1)
    cpu::parallel_for(static_cast<int64_t>(p.B) * p.Hq, num_threads, [&](int64_t bh) { merge_item(p, bh); });
}

}  // namespace

int paged_decode_cpu(const attn::DecodeParams& params, int num_threads) {
  if (!attn::decode_params_ok(params)) return kBadArgument;
  if (params.B == 0) return kOk;
  int32_t flags = 0;  // this call's bounds flags: bad ids give kBadArgument (Python validates before calling)
  attn::DecodeParams p = params;
  p.flags = &flags;
  switch (p.dtype) {
    case kFloat32: decode_all<kFloat32>(p, num_threads); break;
    case kFloat16: decode_all<kFloat16>(p, num_threads); break;
    case kBFloat16: decode_all<kBFloat16>(p, num_threads); break;
    default: return kUnsupported;
  }
  if (flags) set_flag(params.flags, flags);
  return flags ? kBadArgument : kOk;
}

}  // namespace dsmath
