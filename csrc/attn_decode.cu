// CUDA split-KV paged decode (flash-decoding) for GQA/MQA and absorbed MLA. Grid = (kv head x head tile, split,
// sequence): a CTA of 4 warps streams one split of one sequence's KV once for GT query heads sharing a kv head.
// Within a warp, LPT = W / 8 lanes hold one token's row (8 elements per lane per W-wide chunk, 16-byte loads), so
// 32 / LPT tokens are in flight per load and dot products reduce over LPT lanes only. Each lane group keeps its
// own online-softmax state; groups, then warps, merge by log-sum-exp (dsmath/attention.h, shared with the CPU
// kernel). With one split the CTA writes the output; otherwise a second kernel merges the splits' (o, lse).
// 64-bit offsets, no host sync, no allocation: CUDA-graph safe.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dsmath/attention.h"
#include "dsmath/launchers.h"
#include "dsmath/cuda_status.cuh"

namespace dsmath {
namespace {

using attn::DecodeParams;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

// 8 consecutive elements of dtype DT loaded with 16-byte loads (two for fp32) and widened to fp32.
template <int DT>
struct Vec8 {
  static constexpr int kWords = DT == kFloat32 ? 2 : 1;
  uint4 r[kWords];

  __device__ __forceinline__ void load(const void* base, int64_t off) {
    const int esize = DT == kFloat32 ? 4 : 2;
    const uint4* ptr = reinterpret_cast<const uint4*>(static_cast<const char*>(base) + off * esize);
#pragma unroll
    for (int w = 0; w < kWords; ++w) r[w] = __ldg(ptr + w);
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int w = 0; w < kWords; ++w) r[w] = make_uint4(0u, 0u, 0u, 0u);
  }
  __device__ __forceinline__ void to_float(float* f) const {
    if constexpr (DT == kFloat32) {
      const uint32_t* u = reinterpret_cast<const uint32_t*>(r);
#pragma unroll
      for (int i = 0; i < 8; ++i) f[i] = __uint_as_float(u[i]);
    } else {
      const uint32_t u[4] = {r[0].x, r[0].y, r[0].z, r[0].w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if constexpr (DT == kFloat16) {
          __half2 h = *reinterpret_cast<const __half2*>(&u[i]);
          float2 t = __half22float2(h);
          f[2 * i] = t.x;
          f[2 * i + 1] = t.y;
        } else {
          f[2 * i] = __uint_as_float(u[i] << 16);
          f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
        }
      }
    }
  }
};

// W: row chunk width (LPT = W / 8 lanes per token); DCH / VCH: chunks covering D / Dv; GT: heads per CTA;
// U: token steps per warp iteration (loads in flight); SV: values are the first Dv columns of the key rows (MLA),
// taken from the key registers instead of loaded again.
template <int DT, int W, int DCH, int VCH, int GT, int U, bool SV = false>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeParams p) {
  constexpr int LPT = W / 8, TPW = 32 / LPT;
  __shared__ float sm_m[kWarps][GT], sm_l[kWarps][GT];
  __shared__ float sm_acc[kWarps][GT][VCH * W];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, sg = lane / LPT, sl = lane % LPT;
  const int s = blockIdx.y, b = blockIdx.z;
  const int G = p.Hq / p.Hkv, tiles = (G + GT - 1) / GT;
  const int kvh = blockIdx.x / tiles, g0 = (blockIdx.x % tiles) * GT, nh = min(GT, G - g0);
  int64_t begin, end;
  attn::split_range(s, p.num_splits, p.chunk, attn::checked_len(p, b), begin, end);

  float q[GT][DCH][8];
  const float qs = p.scale * attn::kLog2e;
#pragma unroll
  for (int g = 0; g < GT; ++g)
#pragma unroll
    for (int c = 0; c < DCH; ++c) {
      const int d0 = c * W + sl * 8;
      Vec8<DT> t;
      if (g < nh && d0 < p.D) t.load(p.q, b * p.q_sb + static_cast<int64_t>(kvh * G + g0 + g) * p.q_sh + d0);
      else t.zero();
      t.to_float(q[g][c]);
#pragma unroll
      for (int i = 0; i < 8; ++i) q[g][c][i] *= qs;
    }

  float m[GT], l[GT], acc[GT][VCH][8];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int c = 0; c < VCH; ++c)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][c][i] = 0.f;
  }

  const int32_t* bt = p.block_tables + b * p.bt_sb;
  const attn::BlockDiv div(p.block_size);
  const int64_t kh = static_cast<int64_t>(kvh) * p.k_sh, vh = static_cast<int64_t>(kvh) * p.v_sh;
  for (int64_t base = begin + warp * TPW * U; base < end; base += kWarps * TPW * U) {
    Vec8<DT> kr[U][DCH], vr[U][VCH];
    bool live[U];  // token in range with a valid block id (a bad id is an absent token and a flag)
#pragma unroll
    for (int u = 0; u < U; ++u) {  // issue every load of the U steps before any math
      const int64_t pos = base + u * TPW + sg;
      bool ok = pos < end;
      int64_t ko = 0, vo = 0;
      if (ok) {
        int64_t off;
        const int64_t blk = attn::token_block(bt, pos, div, off);
        ok = attn::block_ok(blk, p);
        ko = blk * p.k_sblk + off * p.k_stok + kh;
        vo = blk * p.v_sblk + off * p.v_stok + vh;
      }
      live[u] = ok;
#pragma unroll
      for (int c = 0; c < DCH; ++c) {
        if (ok && c * W + sl * 8 < p.D) kr[u][c].load(p.k, ko + c * W + sl * 8);
        else kr[u][c].zero();
      }
#pragma unroll
      for (int c = 0; c < VCH; ++c) {
        if constexpr (SV) {
          vr[u][c] = kr[u][c];  // columns >= Dv feed accumulator lanes that are never written out
        } else {
          if (ok && c * W + sl * 8 < p.Dv) vr[u][c].load(p.v, vo + c * W + sl * 8);
          else vr[u][c].zero();
        }
      }
    }
    // scores of the U tokens of this lane group, reduced over its LPT lanes
    float sc[U][GT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int g = 0; g < GT; ++g) sc[u][g] = 0.f;
#pragma unroll
      for (int c = 0; c < DCH; ++c) {
        float kf[8];
        kr[u][c].to_float(kf);
#pragma unroll
        for (int g = 0; g < GT; ++g)
#pragma unroll
          for (int i = 0; i < 8; ++i) sc[u][g] = fmaf(q[g][c][i], kf[i], sc[u][g]);
      }
#pragma unroll
      for (int g = 0; g < GT; ++g) {
#pragma unroll
        for (int off = LPT / 2; off > 0; off >>= 1) sc[u][g] += __shfl_xor_sync(0xffffffffu, sc[u][g], off);
      }
      if (!live[u]) {
#pragma unroll
        for (int g = 0; g < GT; ++g) sc[u][g] = -INFINITY;
      }
    }
    // one online-softmax rescale per U tokens, then acc += p v
    float vf[U][VCH][8];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int c = 0; c < VCH; ++c) vr[u][c].to_float(vf[u][c]);
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      float su[U], pu[U], alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) su[u] = sc[u][g];
      attn::online_update_tile<U>(m[g], l[g], su, alpha, pu);
#pragma unroll
      for (int c = 0; c < VCH; ++c)
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          float a = acc[g][c][i] * alpha;
#pragma unroll
          for (int u = 0; u < U; ++u) a = fmaf(pu[u], vf[u][c][i], a);
          acc[g][c][i] = a;
        }
    }
  }

  // merge the lane groups of the warp (each saw different tokens)
#pragma unroll
  for (int off = LPT; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[g], off), lo = __shfl_xor_sync(0xffffffffu, l[g], off);
      float wa, wb;
      attn::merge_weights(m[g], l[g], mo, lo, wa, wb);
#pragma unroll
      for (int c = 0; c < VCH; ++c)
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float ao = __shfl_xor_sync(0xffffffffu, acc[g][c][i], off);
          acc[g][c][i] = acc[g][c][i] * wa + ao * wb;
        }
    }
  }
  if (sg == 0) {
#pragma unroll
    for (int g = 0; g < GT; ++g) {
#pragma unroll
      for (int c = 0; c < VCH; ++c)
#pragma unroll
        for (int i = 0; i < 8; ++i) sm_acc[warp][g][c * W + sl * 8 + i] = acc[g][c][i];
      if (sl == 0) {
        sm_m[warp][g] = m[g];
        sm_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();

  // merge the warps; write the output (one split) or this split's normalised partial and its lse
  for (int idx = threadIdx.x; idx < nh * p.Dv; idx += kThreads) {
    const int g = idx / p.Dv, d = idx % p.Dv;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sm_m[w][g]);
    float L = 0.f, o = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float wt = attn::exp2_(sm_m[w][g] - M);
        L += sm_l[w][g] * wt;
        o += sm_acc[w][g][d] * wt;
      }
    }
    const float val = L > 0.f ? o / L : 0.f;
    const int64_t bh = static_cast<int64_t>(b) * p.Hq + kvh * G + g0 + g;
    if (p.num_splits == 1) {
      attn::store_from_float(p.out, bh * p.Dv + d, val, p.dtype);
    } else {
      const int64_t row = bh * p.num_splits + s;
      p.part_o[row * p.Dv + d] = val;
      if (d == 0) p.part_lse[row] = attn::state_lse(M, L);
    }
  }
}

__global__ void __launch_bounds__(kThreads) merge_kernel(const DecodeParams p) {
  const int64_t bh = blockIdx.x;
  const int S = p.num_splits;
  const float* o = p.part_o + bh * S * p.Dv;
  const float* lse = p.part_lse + bh * S;
  for (int d = threadIdx.x; d < p.Dv; d += kThreads)
    attn::store_from_float(p.out, bh * p.Dv + d, attn::merge_splits(o + d, p.Dv, lse, S), p.dtype);
}

template <int DT, int W, int DCH, int VCH, int GT, int U, bool SV = false>
void launch(const DecodeParams& p, cudaStream_t st) {
  const int G = p.Hq / p.Hkv, tiles = (G + GT - 1) / GT;
  dim3 grid(p.Hkv * tiles, p.num_splits, p.B);  // head tiles of one (split, kv head) adjacent: they share L2
  decode_kernel<DT, W, DCH, VCH, GT, U, SV><<<grid, kThreads, 0, st>>>(p);
}

// Heads per CTA: 1 (MHA) or 4 — 4 keeps 4 token steps of loads in flight at ~160 registers; larger groups run as
// several head tiles, adjacent in the grid so their reads of the same KV hit L2.
template <int DT, int W>
int launch_gqa(const DecodeParams& p, cudaStream_t st) {
  if (p.Hq == p.Hkv) launch<DT, W, 1, 1, 1, 4>(p, st);
  else launch<DT, W, 1, 1, 4, 4>(p, st);
  return kOk;
}

template <int DT>
int launch_dtype(const DecodeParams& p, cudaStream_t st) {
  const int mx = p.D > p.Dv ? p.D : p.Dv;
  if (mx <= 64) return launch_gqa<DT, 64>(p, st);
  if (mx <= 128) return launch_gqa<DT, 128>(p, st);
  if (mx <= 256) return launch_gqa<DT, 256>(p, st);
  if (p.D <= 768 && p.Dv <= 512) {  // MLA: 576-wide latent rows, 512-wide values
    const bool shared_v = p.v == p.k && p.v_sblk == p.k_sblk && p.v_stok == p.k_stok && p.v_sh == p.k_sh;
    if (shared_v) launch<DT, 256, 3, 2, 4, 1, true>(p, st);
    else launch<DT, 256, 3, 2, 2, 1>(p, st);
    return kOk;
  }
  return kUnsupported;
}

}  // namespace

int paged_decode_cuda(const DecodeParams& p, void* stream) {
  if (!attn::decode_params_ok(p) || p.D % 8 || p.Dv % 8) return kBadArgument;
  if (p.B == 0) return kOk;
  if (p.dtype != kFloat32 && p.dtype != kFloat16 && p.dtype != kBFloat16) return kUnsupported;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  // The batch is grid.z: more than DSMATH_MAX_GRID_YZ sequences run as several launches on offset pointers.
  const int64_t esize = p.dtype == kFloat32 ? 4 : 2;
  for (int64_t b0 = 0; b0 < p.B; b0 += DSMATH_MAX_GRID_YZ) {
    DecodeParams c = p;
    c.B = static_cast<int>(p.B - b0 < DSMATH_MAX_GRID_YZ ? p.B - b0 : DSMATH_MAX_GRID_YZ);
    c.q = static_cast<const char*>(p.q) + b0 * p.q_sb * esize;
    c.block_tables = p.block_tables + b0 * p.bt_sb;
    c.seq_lens = p.seq_lens + b0;
    c.out = static_cast<char*>(p.out) + b0 * p.Hq * p.Dv * esize;
    if (p.num_splits > 1) {
      c.part_o = p.part_o + b0 * p.Hq * p.num_splits * p.Dv;
      c.part_lse = p.part_lse + b0 * p.Hq * p.num_splits;
    }
    int status = kUnsupported;
    switch (c.dtype) {
      case kFloat32: status = launch_dtype<kFloat32>(c, st); break;
      case kFloat16: status = launch_dtype<kFloat16>(c, st); break;
      default: status = launch_dtype<kBFloat16>(c, st); break;
    }
    if (status != kOk) return status;
    if (c.num_splits > 1)
      merge_kernel<<<static_cast<unsigned>(static_cast<int64_t>(c.B) * c.Hq), kThreads, 0, st>>>(c);
    if ((status = launch_status()) != kOk) return status;
  }
  return kOk;
}

}  // namespace dsmath
