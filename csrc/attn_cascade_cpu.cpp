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
#include <atomic>
#include <cmath>
#include <thread>
#include <vector>

#include "dsmath/cascade.h"
#include "dsmath/launchers.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DSM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DSM_CLONES
#endif

namespace dsmath {
namespace {

using attn::AttendParams;
constexpr int kTok = 64;   // KV tokens per tile
constexpr int kRows = 64;  // query rows per work item
constexpr int kRB = 4;     // rows per register block

// 2^x, vectorisable: round to nearest integer n, Cephes' exp2f polynomial on [-0.5, 0.5] (relative error ~2e-7),
// times 2^n built in the exponent bits. x <= -127 (and -inf) gives 0.
inline float exp2_fast(float x) {
  x = x < -127.f ? -127.f : (x > 127.f ? 127.f : x);
  const float n = std::floor(x + 0.5f);
  const float f = x - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
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

// Run fn(i) for i in [0, n) on up to num_threads threads (dynamic scheduling: items are ragged).
template <typename F>
void parallel_for(int64_t n, int num_threads, F fn) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n)));
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    thread_local Scratch sc;
    for (int64_t i = next++; i < n; i = next++) fn(i, sc);
  };
  if (nt == 1) {
    worker();
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < nt; ++t) pool.emplace_back(worker);
  for (auto& th : pool) th.join();
}

bool bad_args(const AttendParams& p) {
  return p.B < 0 || p.Hkv < 1 || p.Hq % p.Hkv || p.D < 1 || p.Dv < 1 || p.block_size < 1 ||
         p.block_size > attn::kMaxBlockSize || p.num_splits < 1 || p.min_chunk < 1 || p.bt_width < 0 ||
         p.num_blocks < 0 || (!p.out && !p.part_o) || (p.part_o && (!p.part_lse || p.slot0 < 0 ||
                                                                    p.slot0 + p.num_splits > p.nslot)) ||
         (p.tiles && (p.num_tiles < 0 || !p.members || p.heads_per_tile < 1)) ||
         (p.kv_dtype == attn::kFloat8E4M3 && !p.k_scale);
}

}  // namespace

int attend_cpu(const AttendParams& p, int num_threads) {
  if (bad_args(p)) return kBadArgument;
  if (p.B == 0) return kOk;
  const int G = p.Hq / p.Hkv;
  BadRead bad;
  bad.out = p.bad;
  const int S = p.num_splits;
  if (p.tiles) {  // shared pass: tile -> row blocks of its members x heads
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
      if (sc.q.size() < static_cast<size_t>(kRows) * p.D || sc.o.size() < static_cast<size_t>(kRows) * p.Dv ||
          sc.vr.size() < static_cast<size_t>(kTok) * p.Dv)
        sc.size(p.D, p.Dv);
      int64_t begin, end;
      attn::adaptive_split(0, tl[4], s, S, p.min_chunk, kTok, begin, end);
      run_item(p, rows, tl[0], tl[3] / G, begin, end, s, sc, bad);
    });
  } else {  // per-sequence pass: (sequence, kv head, row block of its G heads, split)
    const int blocks = (G + kRows - 1) / kRows;
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
      if (sc.q.size() < static_cast<size_t>(kRows) * p.D || sc.o.size() < static_cast<size_t>(kRows) * p.Dv ||
          sc.vr.size() < static_cast<size_t>(kTok) * p.Dv)
        sc.size(p.D, p.Dv);
      int64_t begin, end;
      attn::adaptive_split(p.start ? p.start[b] : 0, p.seq_lens[b], s, S, p.min_chunk, kTok, begin, end);
      run_item(p, rows, b, kvh, begin, end, s, sc, bad);
    });
  }
  return kOk;
}

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
