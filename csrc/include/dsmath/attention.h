// Shared __host__ __device__ math of paged-KV attention, used by the C++ CPU kernel (attn_decode_cpu.cpp) and the
// CUDA kernel (attn_decode.cu) so each checks the other: KV split ranges, 64-bit paged offsets, the online softmax
// update in base 2, the log-sum-exp merge of partial results, and typed loads/stores.
//
// Scores are kept in the log2 domain: s = (scale * log2 e) * q.k, so exp(x) becomes exp2 (one MUFU op on GPU).
// A partial result over a token range is (o = sum p v / sum p, lse = m + log2(sum p)); ranges merge by
//   out = sum_i 2^(lse_i - M) o_i / sum_i 2^(lse_i - M),  M = max_i lse_i      (empty ranges have lse = -inf).
#pragma once
#include <cmath>
#include <cstdint>

#include "dsmath/common.h"

namespace dsmath {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxBlockSize = 256;
constexpr int kMaxSplits = 256;

// Everything a decode launch needs; strides in elements, all 64-bit (a 128K-token cache overflows int32).
struct DecodeParams {
  const void* q;  // [B, Hq, D]
  int64_t q_sb, q_sh;
  const void* k;  // [NB, BS, Hkv, D]
  int64_t k_sblk, k_stok, k_sh;
  const void* v;  // [NB, BS, Hkv, Dv] (may alias k: MLA values are the first Dv columns of the latent row)
  int64_t v_sblk, v_stok, v_sh;
  const int32_t* block_tables;  // [B, max_blocks]
  int64_t bt_sb;
  const int32_t* seq_lens;  // [B], each in [0, max_blocks * block_size]
  void* out;                // [B, Hq, Dv] contiguous, dtype of q
  float* part_o;            // [B, Hq, S, Dv] when num_splits > 1
  float* part_lse;          // [B, Hq, S]
  int dtype;
  int B, Hq, Hkv, D, Dv, block_size;
  float scale;
  int num_splits, chunk;
  int max_blocks;  // entries per block-table row
  int num_blocks;  // NB: block ids must lie in [0, NB)
  int32_t* flags;  // BoundsFlag bits set on bad ids / lengths (may be null)
};

// Launcher-level checks shared by the CPU and CUDA decode launchers (the CUDA one adds its vector-width rules).
inline bool decode_params_ok(const DecodeParams& p) {
  if (p.B < 0 || p.Hkv < 1 || p.Hq < 1 || p.Hq % p.Hkv || p.D < 1 || p.Dv < 1 || p.block_size < 1 ||
      p.block_size > kMaxBlockSize || p.num_splits < 1 || p.num_splits > kMaxSplits || p.chunk < 1 ||
      p.max_blocks < 0 || p.num_blocks < 0 || (p.B > 0 && (!p.seq_lens || !p.block_tables)))
    return false;
  return p.num_splits == 1 || (p.part_o && p.part_lse);
}

// Length of sequence b, or 0 (flag kBadSeqLen) when it is negative or beyond its block-table row.
DSM_HD int64_t checked_len(const DecodeParams& p, int64_t b) {
  const int64_t len = p.seq_lens[b];
  if (len < 0 || len > static_cast<int64_t>(p.max_blocks) * p.block_size) {
    set_flag(p.flags, kBadSeqLen);
    return 0;
  }
  return len;
}

// True when block id `blk` lies in [0, NB); else flags kBadBlockId (the token is then treated as absent).
DSM_HD bool block_ok(int64_t blk, const DecodeParams& p) {
  if (blk >= 0 && blk < p.num_blocks) return true;
  set_flag(p.flags, kBadBlockId);
  return false;
}

DSM_HD float exp2_(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return std::exp2(x);
#endif
}

DSM_HD float log2_(float x) {
#if defined(__CUDA_ARCH__)
  return log2f(x);
#else
  return std::log2(x);
#endif
}

// Token range [begin, end) of split s; the last split always runs to the end of the sequence, so a plan made for
// a shorter maximum length is slower, never wrong.
DSM_HD void split_range(int s, int num_splits, int chunk, int64_t len, int64_t& begin, int64_t& end) {
  begin = static_cast<int64_t>(s) * chunk;
  end = (s == num_splits - 1) ? len : begin + chunk;
  if (end > len) end = len;
  if (begin > end) begin = end;
}

// Position -> (block-table index, offset in block). Positions are < 2^31 (seq_lens are int32), so 32-bit
// unsigned division suffices; power-of-two block sizes (the usual 16 / 64) use a shift and a mask instead.
struct BlockDiv {
  uint32_t bs;
  int shift;  // log2(bs) when bs is a power of two, else -1

  DSM_HD explicit BlockDiv(int block_size) : bs(static_cast<uint32_t>(block_size)), shift(-1) {
    if ((bs & (bs - 1)) == 0) {
      shift = 0;
      while ((1u << shift) < bs) ++shift;
    }
  }
  DSM_HD void split(int64_t pos, int64_t& index, int64_t& offset) const {
    const uint32_t p = static_cast<uint32_t>(pos);
    if (shift >= 0) {
      index = p >> shift;
      offset = p & (bs - 1);
    } else {
      index = p / bs;
      offset = p - static_cast<uint32_t>(index) * bs;
    }
  }
};

// Block id of token `pos` of a sequence whose block-table row is `bt_row`, and its offset in the block.
DSM_HD int64_t token_block(const int32_t* bt_row, int64_t pos, const BlockDiv& div, int64_t& offset) {
  int64_t index;
  div.split(pos, index, offset);
  return bt_row[index];
}

// Online softmax step over U new scores s[U] (log2 domain): returns the factor `alpha` for the old accumulator
// and the weights p[U] of the new values (acc = alpha acc + sum_u p[u] v[u]); m, l are updated. -inf scores
// (masked tokens) get weight 0; if every score so far is -inf nothing changes.
template <int U>
DSM_HD void online_update_tile(float& m, float& l, const float* s, float& alpha, float* p) {
  float mx = m;
  for (int u = 0; u < U; ++u) mx = s[u] > mx ? s[u] : mx;
  if (mx == -INFINITY) {
    alpha = 1.f;
    for (int u = 0; u < U; ++u) p[u] = 0.f;
    return;
  }
  alpha = exp2_(m - mx);  // m = -inf -> 0
  float sum = 0.f;
  for (int u = 0; u < U; ++u) {
    p[u] = exp2_(s[u] - mx);
    sum += p[u];
  }
  l = l * alpha + sum;
  m = mx;
}

// One-token step (the CPU kernel's form).
DSM_HD void online_update(float& m, float& l, float s, float& alpha, float& p) {
  online_update_tile<1>(m, l, &s, alpha, &p);
}

// Merge two unnormalised states (m_a, l_a, acc_a) and (m_b, l_b, acc_b): acc = wa acc_a + wb acc_b.
DSM_HD void merge_weights(float& m_a, float& l_a, float m_b, float l_b, float& wa, float& wb) {
  const float m = m_a > m_b ? m_a : m_b;
  if (m == -INFINITY) {
    wa = 1.f;
    wb = 0.f;
    return;
  }
  wa = exp2_(m_a - m);
  wb = exp2_(m_b - m);
  l_a = l_a * wa + l_b * wb;
  m_a = m;
}

// lse of a finished state, -inf when it saw no token.
DSM_HD float state_lse(float m, float l) { return l > 0.f ? m + log2_(l) : -INFINITY; }

// Round-to-nearest-even fp32 -> IEEE half (overflow -> inf, NaN stays NaN), identical on host and device.
DSM_HD uint16_t float_to_fp16(float f) {
  const uint32_t b = float_to_bits(f);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t a = b & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520 -> inf
  if (a < 0x38800000u) {                                               // half subnormal or zero
    const float v = bits_to_float(a) * 16777216.f;                     // / 2^-24, exact
    uint32_t r = static_cast<uint32_t>(v);
    const float frac = v - static_cast<float>(r);
    if (frac > 0.5f || (frac == 0.5f && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t h = ((a >> 13) - (112u << 10));
  const uint32_t rest = a & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

DSM_HD void store_from_float(void* p, int64_t i, float v, int dtype) {
  switch (dtype) {
    case kFloat32: static_cast<float*>(p)[i] = v; break;
    case kFloat16: static_cast<uint16_t*>(p)[i] = float_to_fp16(v); break;
    case kBFloat16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: break;
  }
}

// Typed scalar load: DT is a compile-time dtype code (kFloat32 / kFloat16 / kBFloat16).
template <int DT>
DSM_HD float load_t(const void* p, int64_t i) {
  if (DT == kFloat32) return static_cast<const float*>(p)[i];
  if (DT == kFloat16) return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
  return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
}

// Final value of one (sequence, head, dim) from its splits' partials (o [S] at stride Dv, lse [S]).
DSM_HD float merge_splits(const float* o, int64_t o_stride, const float* lse, int S) {
  float M = -INFINITY;
  for (int s = 0; s < S; ++s) M = lse[s] > M ? lse[s] : M;
  if (M == -INFINITY) return 0.f;
  float num = 0.f, den = 0.f;
  for (int s = 0; s < S; ++s) {
    const float w = exp2_(lse[s] - M);
    num += w * o[s * o_stride];
    den += w;
  }
  return num / den;
}

}  // namespace attn
}  // namespace dsmath
