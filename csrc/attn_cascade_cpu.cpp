// CPU tiled paged attention: decode and shared-prefix (cascade) decode, GQA and MLA (dsmath/cascade.h).
//
// A work item is one block of <= kRows query rows (heads of one kv head, of one sequence or of every member of a
// shared-prefix group) over one KV split. It walks the split in tiles of kTok tokens: each tile's rows are
// converted to fp32 once (K also transposed) and used by every query row of the block, so the scores and the
// value sums are small matrix products (register-blocked, vectorised loops) instead of one dot product per token
// and head; the online softmax rescales once per tile, not per token. This is what makes the shared pass cheap
// on a CPU: the shared prefix is read and converted once per group (per row block), not once per sequence.
// Block ids outside [0, NB) and table reads past bt_width are never followed: their tokens count as empty and the
// first one is reported through p.bad, so Python raises a ValueError naming block_tables / seq_lens.
//
// Vector width: the hot functions are compiled three times (x86-64-v4 / AVX-512, v3 / AVX2+FMA, baseline) and the
// loader picks the widest the CPU supports (GCC target_clones), so the portable wheel still uses AVX-512.
#include <algorithm>
#include <cstdlib>
#include <string>
#include <atomic>
#include <cmath>
#include <vector>

#include "dsmath/cascade.h"
#include "dsmath/cpu_parallel.h"
#include "dsmath/launchers.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DSM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DSM_CLONES
#endif
#define DSM_INLINE __attribute__((always_inline)) inline
// The vector types never cross a non-inlined call (exp2_poly and the GEMM engine's helpers are DSM_INLINE); GCC's
// note about their ABI (emitted at instantiation, at the end of the file) does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace dsmath {
namespace {

using attn::AttendParams;
constexpr int kTok = 64;   // KV tokens per tile
constexpr int kRows = 64;  // query rows per work item
constexpr int kRB = 4;     // rows per register block

// Cephes' exp2f polynomial on [-0.5, 0.5] (relative error ~2e-7) by Horner, for a float or a vector of floats
// (exp2_fast and exp2v); p0: the leading coefficient kExp2Lead, as a float or splat across the lanes.
constexpr float kExp2Lead = 1.535336188319500e-4f;
template <typename T>
DSM_INLINE T exp2_poly(T f, T p0) {
  T p = p0 * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  return p * f + 1.f;
}

// 2^x, vectorisable: round to nearest integer n, exp2_poly of the fraction, times 2^n built in the exponent bits.
// x <= -127 (and -inf) gives 0.
inline float exp2_fast(float x) {
  x = x < -127.f ? -127.f : (x > 127.f ? 127.f : x);
  const float n = std::floor(x + 0.5f);
  const float p = exp2_poly(x - n, kExp2Lead);
  const int e = static_cast<int>(n) + 127;  // 0 -> scale 0 (x = -127)
  return bits_to_float(static_cast<uint32_t>(e) << 23) * p;
}

void to_float(const void* base, int64_t off, int n, int dtype, float* dst) {
  switch (dtype) {
    case kFloat32: {
      const float* s = static_cast<const float*>(base) + off;
      std::copy(s, s + n, dst);
      break;
    }
    case kFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(base) + off;
      for (int i = 0; i < n; ++i) dst[i] = fp16_to_float(s[i]);
      break;
    }
    case kBFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(base) + off;
      for (int i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
      break;
    }
    case attn::kFloat8E4M3: {
      const uint8_t* s = static_cast<const uint8_t*>(base) + off;
      for (int i = 0; i < n; ++i) dst[i] = attn::fp8e4m3_to_float(s[i]);
      break;
    }
    default: std::fill(dst, dst + n, 0.f);
  }
}

struct Scratch {
  std::vector<float> q, o, m, l, kr, kt, vr, s, ks;
  std::vector<char> ok;
  void size(int D, int Dv) {
    q.assign(static_cast<size_t>(kRows) * D, 0.f);
    o.assign(static_cast<size_t>(kRows) * Dv, 0.f);
    m.assign(kRows, 0.f);
    l.assign(kRows, 0.f);
    kr.assign(static_cast<size_t>(kTok) * D, 0.f);
    kt.assign(static_cast<size_t>(kTok) * D, 0.f);
    vr.assign(static_cast<size_t>(kTok) * Dv, 0.f);
    s.assign(static_cast<size_t>(kRows) * kTok, 0.f);
    ks.assign(kTok, 1.f);
    ok.assign(kTok, 0);
  }
};

// The first invalid table read of the call (row, index, value); later ones are ignored.
struct BadRead {
  std::atomic<int> seen{0};
  int64_t* out;
  void report(int64_t row, int64_t index, int64_t value) {
    int expect = 0;
    if (out && seen.compare_exchange_strong(expect, 1)) {
      out[0] = row;
      out[1] = index;
      out[2] = value;
    }
  }
};

// s[r][t] = sum_d q[r][d] kt[d][t] for kRB rows (q rows of stride D, kt [D][kTok]).
DSM_CLONES void scores_block(const float* q, int D, const float* kt, float* s) {
  float acc[kRB][kTok];
  for (int r = 0; r < kRB; ++r)
    for (int t = 0; t < kTok; ++t) acc[r][t] = 0.f;
  for (int d = 0; d < D; ++d) {
    const float* k = kt + static_cast<int64_t>(d) * kTok;
    for (int r = 0; r < kRB; ++r) {
      const float qv = q[static_cast<int64_t>(r) * D + d];
      for (int t = 0; t < kTok; ++t) acc[r][t] += qv * k[t];
    }
  }
  for (int r = 0; r < kRB; ++r)
    for (int t = 0; t < kTok; ++t) s[r * kTok + t] = acc[r][t];
}

// o[r][:] += sum_t p[r][t] v[t][:] for kRB rows (o rows of stride Dv, v rows of stride sv), 64 columns at a time.
DSM_CLONES void pv_block(const float* p, const float* v, int64_t sv, int n, int Dv, float* o) {
  constexpr int C = 64;
  int c0 = 0;
  for (; c0 + C <= Dv; c0 += C) {
    float acc[kRB][C];
    for (int r = 0; r < kRB; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = o[static_cast<int64_t>(r) * Dv + c0 + c];
    for (int t = 0; t < n; ++t) {
      const float* vt = v + t * sv + c0;
      for (int r = 0; r < kRB; ++r) {
        const float pr = p[r * kTok + t];
        for (int c = 0; c < C; ++c) acc[r][c] += pr * vt[c];
      }
    }
    for (int r = 0; r < kRB; ++r)
      for (int c = 0; c < C; ++c) o[static_cast<int64_t>(r) * Dv + c0 + c] = acc[r][c];
  }
  for (; c0 < Dv; ++c0)
    for (int r = 0; r < kRB; ++r) {
      float a = o[static_cast<int64_t>(r) * Dv + c0];
      for (int t = 0; t < n; ++t) a += p[r * kTok + t] * v[t * sv + c0];
      o[static_cast<int64_t>(r) * Dv + c0] = a;
    }
}

// Online softmax over one tile for row r: turns s[r][:] into probabilities (times the fp8 scales), rescales o[r].
DSM_CLONES void softmax_row(float* s, const char* ok, const float* ks, bool fp8, float& m, float& l, float* o,
                            int Dv) {
  float mx = m;
  for (int t = 0; t < kTok; ++t) {
    const float x = ok[t] ? s[t] : -INFINITY;
    s[t] = x;
    mx = x > mx ? x : mx;
  }
  if (mx == -INFINITY) {  // nothing seen yet: weights 0, state unchanged
    for (int t = 0; t < kTok; ++t) s[t] = 0.f;
    return;
  }
  const float alpha = exp2_fast(m - mx);
  float sum = 0.f;
  for (int t = 0; t < kTok; ++t) {
    const float e = exp2_fast(s[t] - mx);
    sum += e;
    s[t] = fp8 ? e * ks[t] : e;
  }
  l = l * alpha + sum;
  m = mx;
  if (alpha != 1.f)
    for (int d = 0; d < Dv; ++d) o[d] *= alpha;
}

// Rows of a work item: query row i reads sequence seq[i], head head[i]; all rows share one kv head.
struct Rows {
  int n = 0;
  int seq[kRows];
  int head[kRows];
};

void run_item(const AttendParams& p, const Rows& rows, int bt_row, int kvh, int64_t begin, int64_t end, int split,
              Scratch& sc, BadRead& bad) {
  const int D = p.D, Dv = p.Dv, nr = rows.n, nrp = (nr + kRB - 1) / kRB * kRB;
  const float qs = p.scale * attn::kLog2e;
  const bool shared_v = p.v == p.k && p.v_sblk == p.k_sblk && p.v_stok == p.k_stok && p.v_sh == p.k_sh;
  const bool fp8 = p.kv_dtype == attn::kFloat8E4M3;
  std::fill(sc.q.begin(), sc.q.begin() + static_cast<int64_t>(nrp) * D, 0.f);
  std::fill(sc.o.begin(), sc.o.begin() + static_cast<int64_t>(nrp) * Dv, 0.f);
  for (int i = 0; i < nr; ++i) {
    float* qi = sc.q.data() + static_cast<int64_t>(i) * D;
    to_float(p.q, rows.seq[i] * p.q_sb + rows.head[i] * p.q_sh, D, p.q_dtype, qi);
    for (int d = 0; d < D; ++d) qi[d] *= qs;
    sc.m[i] = -INFINITY;
    sc.l[i] = 0.f;
  }
  const int32_t* bt = p.block_tables + bt_row * p.bt_sb;
  const attn::BlockDiv div(p.block_size);
  for (int64_t t0 = begin; t0 < end; t0 += kTok) {
    const int n = static_cast<int>(std::min<int64_t>(kTok, end - t0));
    for (int j = 0; j < kTok; ++j) {
      float* kj = sc.kr.data() + static_cast<int64_t>(j) * D;
      sc.ok[j] = 0;
      if (j < n) {
        int64_t index, off;
        div.split(t0 + j, index, off);
        const int64_t blk = index < p.bt_width ? bt[index] : -1;
        if (index >= p.bt_width) bad.report(bt_row, index, -1);
        else if (blk < 0 || blk >= p.num_blocks) bad.report(bt_row, index, blk);
        else {
          sc.ok[j] = 1;
          to_float(p.k, blk * p.k_sblk + off * p.k_stok + kvh * p.k_sh, D, p.kv_dtype, kj);
          if (!shared_v)
            to_float(p.v, blk * p.v_sblk + off * p.v_stok + kvh * p.v_sh, Dv, p.kv_dtype,
                     sc.vr.data() + static_cast<int64_t>(j) * Dv);
          if (fp8) sc.ks[j] = p.k_scale[blk * p.ks_sblk + off];
        }
      }
      if (!sc.ok[j]) {
        std::fill(kj, kj + D, 0.f);
        if (!shared_v) std::fill(sc.vr.data() + static_cast<int64_t>(j) * Dv, sc.vr.data() + (j + 1) * Dv, 0.f);
        sc.ks[j] = 0.f;
      }
    }
    for (int j = 0; j < kTok; ++j)
      for (int d = 0; d < D; ++d) sc.kt[static_cast<int64_t>(d) * kTok + j] = sc.kr[static_cast<int64_t>(j) * D + d];
    for (int r0 = 0; r0 < nrp; r0 += kRB)
      scores_block(sc.q.data() + static_cast<int64_t>(r0) * D, D, sc.kt.data(), sc.s.data() + r0 * kTok);
    for (int r = 0; r < nrp; ++r) {
      float* sr = sc.s.data() + r * kTok;
      if (fp8)
        for (int j = 0; j < kTok; ++j) sr[j] *= sc.ks[j];
      if (r < nr) softmax_row(sr, sc.ok.data(), sc.ks.data(), fp8, sc.m[r], sc.l[r],
                              sc.o.data() + static_cast<int64_t>(r) * Dv, Dv);
      else std::fill(sr, sr + kTok, 0.f);
    }
    const float* v = shared_v ? sc.kr.data() : sc.vr.data();
    const int64_t sv = shared_v ? D : Dv;
    for (int r0 = 0; r0 < nrp; r0 += kRB)
      pv_block(sc.s.data() + r0 * kTok, v, sv, n, Dv, sc.o.data() + static_cast<int64_t>(r0) * Dv);
  }
  for (int i = 0; i < nr; ++i) {
    const float inv = sc.l[i] > 0.f ? 1.f / sc.l[i] : 0.f;
    const float* oi = sc.o.data() + static_cast<int64_t>(i) * Dv;
    const int64_t bh = static_cast<int64_t>(rows.seq[i]) * p.Hq + rows.head[i];
    if (!p.part_o) {
      for (int d = 0; d < Dv; ++d) attn::store_from_float(p.out, bh * Dv + d, oi[d] * inv, p.q_dtype);
    } else {
      const int64_t prow = bh * p.nslot + p.slot0 + split;
      for (int d = 0; d < Dv; ++d) p.part_o[prow * Dv + d] = oi[d] * inv;
      p.part_lse[prow] = attn::state_lse(sc.m[i], sc.l[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------- GEMM engine
// The shared pass as two register-blocked matrix products per KV tile of kT tokens, for R query rows (members x
// heads of a group) at once:
//   scores  S^T[t][r] = sum_d K[t][d] Q^T[d][r]   micro-tile MT tokens x NV vectors of rows (rows in SIMD lanes):
//                                                  per d, NV vector loads of the packed Q^T panel + MT broadcasts
//                                                  of K[t][d] + MT x NV FMAs (AVX-512: 6 x 64, 24 accumulators);
//   softmax over t for every row at once (rows in lanes), rescale factors alpha[r];
//   values  O[r][c] = alpha[r] O[r][c] + sum_t P^T[t][r] V[t][c]   micro-tile MR rows x NC vectors of columns
//                                                  (AVX-512: 6 x 64, 24 accumulators): per t, NC vector loads of
//                                                  the V row + MR broadcasts of P + MR x NC FMAs.
// K is used in its row-major cache layout by both products (no transpose): an fp32 cache is read in place through
// one pointer per token; 16-bit and fp8 caches are converted (fp8: times the token scale) once per tile into a
// contiguous fp32 panel. Q is packed once per work item as panels Q^T [D][NV x L] (scaled by scale * log2 e).
// Accumulator counts fit the register file of each ISA: AVX-512 (32 zmm) 24, AVX2 (16 ymm) and the portable
// 4-lane build 12; the engine is compiled once per ISA (target attributes) and picked at load time.
namespace gemm {

constexpr int kT = 96;         // tokens per KV tile: a multiple of every micro-tile's MT (6, 8, 12, 24)
constexpr int kPrefetch = 32;  // K-row prefetch distance in floats (two lines)

template <int L> struct VT {
  typedef float f __attribute__((vector_size(4 * L)));
  typedef int32_t i __attribute__((vector_size(4 * L)));
};
template <int L> using V = typename VT<L>::f;
template <int L> using VI = typename VT<L>::i;

template <int L> DSM_INLINE V<L> load(const float* p) {
  V<L> v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <int L> DSM_INLINE void store(float* p, const V<L>& v) { __builtin_memcpy(p, &v, sizeof v); }
template <int L> DSM_INLINE V<L> splat(float x) { return V<L>{} + x; }

// 2^x lane-wise: the same Cephes polynomial as exp2_fast (round to nearest by the 1.5 * 2^23 trick); x <= -127
// (and -inf) gives 0.
template <int L> DSM_INLINE V<L> exp2v(V<L> x) {
  const V<L> lo = splat<L>(-127.f), hi = splat<L>(127.f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V<L> n = (x + 12582912.f) - 12582912.f;
  const V<L> p = exp2_poly(x - n, splat<L>(kExp2Lead));
  const VI<L> e = (__builtin_convertvector(n, VI<L>) + 127) << 23;  // n = -127 -> 0
  V<L> scale;
  __builtin_memcpy(&scale, &e, sizeof scale);
  return scale * p;
}

// S^T[i][v*L + lane] (row stride ss) = sum_d krow[i][d] * qp[d][v*L + lane], i < MT, v < NV.
// The K rows stream from memory when few rows share them (16-row items: 1 FMA per loaded K element): each row is
// prefetched kPrefetch floats ahead once per 64-byte line.
template <int L, int MT, int NV>
DSM_INLINE void qk_tile(const float* const* krow, const float* qp, int D, float* s, int64_t ss) {
  V<L> acc[MT][NV];
  for (int i = 0; i < MT; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V<L>{};
  const float* k[MT];
  for (int i = 0; i < MT; ++i) k[i] = krow[i];
  for (int d = 0; d < D; ++d) {
    if ((d & 15) == 0)
      for (int i = 0; i < MT; ++i) __builtin_prefetch(k[i] + d + kPrefetch);
    V<L> b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load<L>(qp + static_cast<int64_t>(d) * NV * L + v * L);
    for (int i = 0; i < MT; ++i) {
      const V<L> a = splat<L>(k[i][d]);
      for (int v = 0; v < NV; ++v) acc[i][v] += a * b[v];
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int v = 0; v < NV; ++v) store<L>(s + i * ss + v * L, acc[i][v]);
}

// o[i][c*L + lane] (row stride os) = alpha[i] o[i][...] + sum_t pt[t][i] * vrow[t][c0 + c*L + lane], i < MR, c < NC.
template <int L, int MR, int NC>
DSM_INLINE void pv_tile(const float* pt, int64_t ps, const float* const* vrow, int c0, int n, const float* alpha,
                        float* o, int64_t os) {
  V<L> acc[MR][NC];
  for (int i = 0; i < MR; ++i) {
    const V<L> a = splat<L>(alpha[i]);
    for (int c = 0; c < NC; ++c) acc[i][c] = load<L>(o + i * os + c * L) * a;
  }
  for (int t = 0; t < n; ++t) {
    const float* vr = vrow[t] + c0;
    V<L> b[NC];
    for (int c = 0; c < NC; ++c) b[c] = load<L>(vr + c * L);
    const float* pr = pt + t * ps;
    for (int i = 0; i < MR; ++i) {
      const V<L> a = splat<L>(pr[i]);
      for (int c = 0; c < NC; ++c) acc[i][c] += a * b[c];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int c = 0; c < NC; ++c) store<L>(o + i * os + c * L, acc[i][c]);
}

// Online softmax of one tile, rows in lanes: s = S^T [n][ss] (ss = Rp, a multiple of L) becomes P^T; m, l, alpha
// [Rp]. Masked tokens (ok = 0) weigh 0; rows that have seen nothing keep m = -inf, l = 0.
template <int L>
DSM_INLINE void softmax_tile(float* s, int64_t ss, const char* ok, int n, int Rp, float* m, float* l, float* alpha) {
  const V<L> ninf = splat<L>(-INFINITY), zero = V<L>{};
  for (int r = 0; r < Rp; r += L) {
    const V<L> mo = load<L>(m + r);
    V<L> mx = mo;
    for (int t = 0; t < n; ++t)
      if (ok[t]) {
        const V<L> x = load<L>(s + t * ss + r);
        mx = x > mx ? x : mx;
      }
    const V<L> mxe = mx == ninf ? zero : mx;
    const V<L> al = exp2v<L>(mo - mxe);
    V<L> sum = zero;
    for (int t = 0; t < n; ++t) {
      const V<L> pv = ok[t] ? exp2v<L>(load<L>(s + t * ss + r) - mxe) : zero;
      store<L>(s + t * ss + r, pv);
      sum += pv;
    }
    store<L>(l + r, load<L>(l + r) * al + sum);
    store<L>(m + r, mx);
    store<L>(alpha + r, al);
  }
}

// ISA configurations: lanes L, accumulator budget ACC (QK micro-tile = ACC / NV tokens x NV row vectors, NV <=
// NVMAX), PV micro-tile MR rows x NC column vectors.
template <int L_, int ACC_, int NVMAX_, int MR_, int NC_> struct Cfg {
  static constexpr int L = L_, ACC = ACC_, NVMAX = NVMAX_, MR = MR_, NC = NC_;
};
using Avx512 = Cfg<16, 24, 4, 6, 4>;
using Avx2 = Cfg<8, 12, 2, 6, 2>;
using Portable = Cfg<4, 12, 2, 6, 2>;

template <class C, int NV>
DSM_INLINE void qk_panel(const float* const* krow, const float* qp, int D, int n, float* s, int64_t ss) {
  if constexpr (NV <= C::NVMAX) {
    constexpr int MT = C::ACC / NV;
    for (int j = 0; j < n; j += MT)  // tokens past n point at the zero row: whole micro-tiles are safe
      qk_tile<C::L, MT, NV>(krow + j, qp, D, s + j * ss, ss);
  }
}

template <class C, int MR>
DSM_INLINE void pv_rows(const float* pt, int64_t ps, const float* const* vrow, int n, int R, int Dvp,
                        const float* alpha, float* o) {
  if constexpr (MR >= 1) {
    int c0 = 0;
    for (; c0 + C::NC * C::L <= Dvp; c0 += C::NC * C::L)
      pv_tile<C::L, MR, C::NC>(pt, ps, vrow, c0, n, alpha, o + c0, Dvp);
    for (; c0 < Dvp; c0 += C::L) pv_tile<C::L, MR, 1>(pt, ps, vrow, c0, n, alpha, o + c0, Dvp);
  }
}

template <class C, int MR>
DSM_INLINE void pv_tail(int mr, const float* pt, int64_t ps, const float* const* vrow, int n, int R, int Dvp,
                        const float* alpha, float* o) {
  if constexpr (MR >= 1) {
    if (mr == MR) pv_rows<C, MR>(pt, ps, vrow, n, R, Dvp, alpha, o);
    else pv_tail<C, MR - 1>(mr, pt, ps, vrow, n, R, Dvp, alpha, o);
  }
}

// Buffers of one work item (per thread, reused).
struct Buf {
  std::vector<float> qt, o, s, m, l, alpha, kbuf, vbuf, zero, qrow;
  std::vector<const float*> krow, vrow;
  std::vector<char> ok;
};

// One work item: R rows (sequence seq[i], head head[i]) x tokens [begin, end) of table row bt_row, kv head kvh.
template <class C>
DSM_INLINE void item(const AttendParams& p, int R, const int* seq, const int* head, int bt_row, int kvh,
                     int64_t begin, int64_t end, int split, Buf& b, BadRead& bad) {
  constexpr int L = C::L;
  const int D = p.D, Dv = p.Dv;
  const int Rp = (R + L - 1) / L * L, Dvp = (Dv + L - 1) / L * L;
  const bool shared_v = p.v == p.k && p.v_sblk == p.k_sblk && p.v_stok == p.k_stok && p.v_sh == p.k_sh;
  const bool fp8 = p.kv_dtype == attn::kFloat8E4M3, f32 = p.kv_dtype == kFloat32;
  const int kd = std::max(D, Dvp);  // packed K row stride (columns past D are 0: read only as V padding)
  const bool copy_k = !f32, copy_v = !shared_v && (!f32 || Dv % L);
  const bool v_in_k = shared_v && (copy_k || Dvp <= D);  // V rows = K rows (padding columns inside the row)
  const bool copy_vk = shared_v && !v_in_k;                // shared V that must be padded: its own panel
  auto need = [](std::vector<float>& v, size_t n) {
    if (v.size() < n) v.assign(n, 0.f);
  };
  need(b.qt, static_cast<size_t>(Rp) * D);
  need(b.o, static_cast<size_t>(Rp) * Dvp);
  need(b.s, static_cast<size_t>(kT) * Rp);
  need(b.m, Rp);
  need(b.l, Rp);
  need(b.alpha, Rp);
  need(b.zero, kd);
  if (copy_k) need(b.kbuf, static_cast<size_t>(kT) * kd);
  if (copy_v || copy_vk) need(b.vbuf, static_cast<size_t>(kT) * Dvp);
  b.krow.resize(kT);
  b.vrow.resize(kT);
  b.ok.resize(kT);
  // Q^T panels of NVMAX * L rows (the last one narrower): panel at rows [p0, p0 + w) is [D][w] at qt + p0 * D
  const float qs = p.scale * attn::kLog2e;
  need(b.qrow, D);
  float* qi = b.qrow.data();
  for (int p0 = 0; p0 < Rp; p0 += C::NVMAX * L) {
    const int w = std::min(C::NVMAX * L, Rp - p0);
    float* panel = b.qt.data() + static_cast<int64_t>(p0) * D;
    for (int r = 0; r < w; ++r) {
      if (p0 + r < R) {
        to_float(p.q, seq[p0 + r] * p.q_sb + head[p0 + r] * p.q_sh, D, p.q_dtype, qi);
        for (int d = 0; d < D; ++d) panel[static_cast<int64_t>(d) * w + r] = qi[d] * qs;
      } else {
        for (int d = 0; d < D; ++d) panel[static_cast<int64_t>(d) * w + r] = 0.f;
      }
    }
  }
  std::fill(b.o.begin(), b.o.begin() + static_cast<int64_t>(Rp) * Dvp, 0.f);
  std::fill(b.m.begin(), b.m.begin() + Rp, -INFINITY);
  std::fill(b.l.begin(), b.l.begin() + Rp, 0.f);
  const int32_t* bt = p.block_tables + bt_row * p.bt_sb;
  const attn::BlockDiv div(p.block_size);
  const float* zero = b.zero.data();
  for (int64_t t0 = begin; t0 < end; t0 += kT) {
    const int n = static_cast<int>(std::min<int64_t>(kT, end - t0));
    for (int j = 0; j < kT; ++j) {
      b.ok[j] = 0;
      b.krow[j] = b.vrow[j] = zero;
      if (j >= n) continue;
      int64_t index, off;
      div.split(t0 + j, index, off);
      const int64_t blk = index < p.bt_width ? bt[index] : -1;
      if (index >= p.bt_width) {
        bad.report(bt_row, index, -1);
        continue;
      }
      if (blk < 0 || blk >= p.num_blocks) {
        bad.report(bt_row, index, blk);
        continue;
      }
      b.ok[j] = 1;
      const int64_t ko = blk * p.k_sblk + off * p.k_stok + kvh * p.k_sh;
      const int64_t vo = blk * p.v_sblk + off * p.v_stok + kvh * p.v_sh;
      // one row to fp32 (fp8: times its per-token scale, shared by the key and the value)
      auto load_row = [&](const void* src, int64_t o, int n, float* dst) {
        to_float(src, o, n, p.kv_dtype, dst);
        if (fp8) {
          const float sc = p.k_scale[blk * p.ks_sblk + off];
          for (int d = 0; d < n; ++d) dst[d] *= sc;
        }
      };
      if (copy_k) {
        float* kj = b.kbuf.data() + static_cast<int64_t>(j) * kd;
        load_row(p.k, ko, D, kj);
        b.krow[j] = kj;
      } else {
        b.krow[j] = static_cast<const float*>(p.k) + ko;
      }
      if (v_in_k) {
        b.vrow[j] = b.krow[j];
      } else if (copy_v || copy_vk) {
        float* vj = b.vbuf.data() + static_cast<int64_t>(j) * Dvp;
        load_row(shared_v ? p.k : p.v, shared_v ? ko : vo, Dv, vj);
        b.vrow[j] = vj;
      } else {
        b.vrow[j] = static_cast<const float*>(p.v) + vo;
      }
    }
    float* s = b.s.data();
    for (int p0 = 0; p0 < Rp; p0 += C::NVMAX * L) {
      const int nv = std::min(C::NVMAX * L, Rp - p0) / L;
      const float* qp = b.qt.data() + static_cast<int64_t>(p0) * D;
      switch (nv) {
        case 1: qk_panel<C, 1>(b.krow.data(), qp, D, n, s + p0, Rp); break;
        case 2: qk_panel<C, 2>(b.krow.data(), qp, D, n, s + p0, Rp); break;
        case 3: qk_panel<C, 3>(b.krow.data(), qp, D, n, s + p0, Rp); break;
        default: qk_panel<C, 4>(b.krow.data(), qp, D, n, s + p0, Rp); break;
      }
    }
    softmax_tile<L>(s, Rp, b.ok.data(), n, Rp, b.m.data(), b.l.data(), b.alpha.data());
    int r0 = 0;
    for (; r0 + C::MR <= R; r0 += C::MR)
      pv_rows<C, C::MR>(s + r0, Rp, b.vrow.data(), n, R, Dvp, b.alpha.data() + r0,
                        b.o.data() + static_cast<int64_t>(r0) * Dvp);
    if (r0 < R)
      pv_tail<C, C::MR - 1>(R - r0, s + r0, Rp, b.vrow.data(), n, R, Dvp, b.alpha.data() + r0,
                            b.o.data() + static_cast<int64_t>(r0) * Dvp);
  }
  for (int i = 0; i < R; ++i) {
    const float inv = b.l[i] > 0.f ? 1.f / b.l[i] : 0.f;
    const float* oi = b.o.data() + static_cast<int64_t>(i) * Dvp;
    const int64_t bh = static_cast<int64_t>(seq[i]) * p.Hq + head[i];
    if (!p.part_o) {
      for (int d = 0; d < Dv; ++d) attn::store_from_float(p.out, bh * Dv + d, oi[d] * inv, p.q_dtype);
    } else {
      const int64_t prow = bh * p.nslot + p.slot0 + split;
      for (int d = 0; d < Dv; ++d) p.part_o[prow * Dv + d] = oi[d] * inv;
      p.part_lse[prow] = attn::state_lse(b.m[i], b.l[i]);
    }
  }
}

#undef DSM_INLINE

using ItemFn = void (*)(const AttendParams&, int, const int*, const int*, int, int, int64_t, int64_t, int, Buf&,
                        BadRead&);

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target("arch=x86-64-v4"))) void item_avx512(const AttendParams& p, int R, const int* seq,
                                                            const int* head, int bt_row, int kvh, int64_t begin,
                                                            int64_t end, int split, Buf& b, BadRead& bad) {
  item<Avx512>(p, R, seq, head, bt_row, kvh, begin, end, split, b, bad);
}
__attribute__((target("arch=x86-64-v3"))) void item_avx2(const AttendParams& p, int R, const int* seq,
                                                          const int* head, int bt_row, int kvh, int64_t begin,
                                                          int64_t end, int split, Buf& b, BadRead& bad) {
  item<Avx2>(p, R, seq, head, bt_row, kvh, begin, end, split, b, bad);
}
#endif
void item_portable(const AttendParams& p, int R, const int* seq, const int* head, int bt_row, int kvh,
                   int64_t begin, int64_t end, int split, Buf& b, BadRead& bad) {
  item<Portable>(p, R, seq, head, bt_row, kvh, begin, end, split, b, bad);
}

struct Engine {
  ItemFn item;
  int lanes;
  const char* isa;
};

// The widest engine this CPU runs, at most as wide as `engine` (attn::kCpuEngine*) allows.
Engine pick(int engine) {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (engine != attn::kCpuEngineAvx2 && engine != attn::kCpuEnginePortable && __builtin_cpu_supports("x86-64-v4"))
    return {item_avx512, Avx512::L, "avx512"};
  if (engine != attn::kCpuEnginePortable && __builtin_cpu_supports("x86-64-v3")) return {item_avx2, Avx2::L, "avx2"};
#endif
  return {item_portable, Portable::L, "portable"};
}

}  // namespace gemm

// fn(i, this thread's scratch) for i in [0, n) (cpu::parallel_for: dynamic scheduling, items are ragged).
template <typename F>
void parallel_for(int64_t n, int num_threads, F fn) {
  cpu::parallel_for(n, num_threads, [&](int64_t i) {
    thread_local Scratch sc;
    fn(i, sc);
  });
}

bool bad_args(const AttendParams& p) {
  return p.B < 0 || p.Hkv < 1 || p.Hq % p.Hkv || p.D < 1 || p.Dv < 1 || p.block_size < 1 ||
         p.block_size > attn::kMaxBlockSize || p.num_splits < 1 || p.min_chunk < 1 || p.bt_width < 0 ||
         p.num_blocks < 0 || (!p.out && !p.part_o) || (p.part_o && (!p.part_lse || p.slot0 < 0 ||
                                                                    p.slot0 + p.num_splits > p.nslot)) ||
         (p.tiles && (p.num_tiles < 0 || !p.members || p.heads_per_tile < 1)) ||
         (p.kv_dtype == attn::kFloat8E4M3 && !p.k_scale) || p.engine < 0 || p.engine > attn::kCpuEngineRows;
}

}  // namespace

int attend_cpu(const AttendParams& p, int num_threads) {
  if (bad_args(p)) return kBadArgument;
  if (p.B == 0) return kOk;
  const int G = p.Hq / p.Hkv;
  BadRead bad;
  bad.out = p.bad;
  const int S = p.num_splits;
  const gemm::Engine engine = gemm::pick(p.engine);
  if (p.tiles) {  // shared pass: tile -> row blocks of its members x heads, on the GEMM engine
    std::vector<int64_t> first(p.num_tiles + 1, 0);  // first row-block item of each tile
    for (int t = 0; t < p.num_tiles; ++t) {
      const int32_t* tl = p.tiles + t * attn::kTileCols;
      const int64_t nrows = static_cast<int64_t>(std::max(0, tl[2] - tl[1])) * p.heads_per_tile;
      first[t + 1] = first[t] + (nrows + kRows - 1) / kRows;
    }
    parallel_for(first[p.num_tiles] * S, num_threads, [&](int64_t i, Scratch& sc) {
      const int s = static_cast<int>(i % S);
      const int64_t blk = i / S;
      const int t = static_cast<int>(std::upper_bound(first.begin(), first.end(), blk) - first.begin()) - 1;
      const int32_t* tl = p.tiles + t * attn::kTileCols;
      const int HT = p.heads_per_tile;
      Rows rows;
      const int64_t r0 = (blk - first[t]) * kRows, nrows = static_cast<int64_t>(tl[2] - tl[1]) * HT;
      for (int64_t r = r0; r < std::min<int64_t>(nrows, r0 + kRows); ++r) {
        rows.seq[rows.n] = p.members[tl[1] + r / HT];
        rows.head[rows.n] = tl[3] + static_cast<int>(r % HT);
        ++rows.n;
      }
      thread_local gemm::Buf buf;
      int64_t begin, end;
      attn::adaptive_split(0, tl[4], s, S, p.min_chunk, kTok, begin, end);
      engine.item(p, rows.n, rows.seq, rows.head, tl[0], tl[3] / G, begin, end, s, buf, bad);
    });
  } else {  // per-sequence pass: (sequence, kv head, row block of its G heads, split)
    const int blocks = (G + kRows - 1) / kRows;
    // the engine once a sequence's heads fill its vectors (MLA: 16-128 heads); few GQA heads: the row-block kernel
    const bool gemm_rows = p.engine != attn::kCpuEngineRows && std::min(G, kRows) >= engine.lanes;
    parallel_for(static_cast<int64_t>(p.B) * p.Hkv * blocks * S, num_threads, [&](int64_t i, Scratch& sc) {
      const int s = static_cast<int>(i % S);
      const int rb = static_cast<int>((i / S) % blocks);
      const int kvh = static_cast<int>((i / (static_cast<int64_t>(S) * blocks)) % p.Hkv);
      const int b = static_cast<int>(i / (static_cast<int64_t>(S) * blocks * p.Hkv));
      Rows rows;
      for (int g = rb * kRows; g < std::min(G, (rb + 1) * kRows); ++g) {
        rows.seq[rows.n] = b;
        rows.head[rows.n] = kvh * G + g;
        ++rows.n;
      }
      int64_t begin, end;
      attn::adaptive_split(p.start ? p.start[b] : 0, p.seq_lens[b], s, S, p.min_chunk, kTok, begin, end);
      if (gemm_rows) {
        thread_local gemm::Buf buf;
        engine.item(p, rows.n, rows.seq, rows.head, b, kvh, begin, end, s, buf, bad);
      } else {
        if (sc.q.size() < static_cast<size_t>(kRows) * p.D || sc.o.size() < static_cast<size_t>(kRows) * p.Dv ||
            sc.vr.size() < static_cast<size_t>(kTok) * p.Dv)
          sc.size(p.D, p.Dv);
        run_item(p, rows, b, kvh, begin, end, s, sc, bad);
      }
    });
  }
  return kOk;
}

const char* attend_cpu_isa(int engine) { return gemm::pick(engine).isa; }

int merge_partials_cpu(const float* part_o, const float* part_lse, void* out, int dtype, int64_t rows, int nslot,
                       int Dv, int num_threads) {
  if (rows < 0 || nslot < 1 || Dv < 1 || !part_o || !part_lse || !out) return kBadArgument;
  parallel_for(rows, num_threads, [&](int64_t r, Scratch&) {
    const float* lse = part_lse + r * nslot;
    float M = -INFINITY;
    for (int s = 0; s < nslot; ++s) M = lse[s] > M ? lse[s] : M;
    for (int d = 0; d < Dv; ++d) {
      float num = 0.f, den = 0.f;
      if (M != -INFINITY)
        for (int s = 0; s < nslot; ++s) {
          if (lse[s] == -INFINITY) continue;  // empty slot: never written, not read
          const float w = attn::exp2_(lse[s] - M);
          num += w * part_o[(r * nslot + s) * Dv + d];
          den += w;
        }
      attn::store_from_float(out, r * Dv + d, den > 0.f ? num / den : 0.f, dtype);
    }
  });
  return kOk;
}

}  // namespace dsmath
