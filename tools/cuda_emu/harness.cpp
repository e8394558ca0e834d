// Emulated CUDA decode kernel (csrc/attn_decode.cu through emu.h) vs the C++ CPU kernel, both via attn::DecodeParams.
// Built and run by run.sh; exits non-zero if they disagree beyond fp32 / 16-bit rounding.
#include "emu.h"
#include "dsmath/common.h"
float fp16_to_float_emu(uint16_t h) { return dsmath::fp16_to_float(h); }
#include "attn_decode_emu.cu"
#include <random>

namespace dsmath {
int paged_decode_cpu(const attn::DecodeParams& p, int num_threads);
int cache_write_cuda(const void* src, int64_t src_s, void* cache, int64_t s_blk, int64_t s_tok, int block_size,
                     int64_t row, int dtype, const void* slots, int slot_dtype, int64_t N, void* stream);
}  // namespace dsmath
using namespace dsmath;

template <int DT> uint16_t enc(float f) { return DT == kFloat16 ? attn::float_to_fp16(f) : float_to_bf16(f); }

// one case: fp32 or 16-bit storage; returns max abs diff between emulated CUDA and CPU kernel
template <int DT>
double run_case(int B, int Hq, int Hkv, int D, int Dv, int bs, std::vector<int> lens, int splits, int chunk,
                bool mla) {
  using T = typename std::conditional<DT == kFloat32, float, uint16_t>::type;
  std::mt19937 rng(B * 131 + Hq * 7 + D + bs);
  std::normal_distribution<float> nd;
  int maxb = 1;
  for (int L : lens) maxb = std::max(maxb, (L + bs - 1) / bs);
  const int NB = B * maxb + 2;
  const int rowk = mla ? D : Hkv * D, rowv = Hkv * Dv;
  std::vector<T> k((size_t)NB * bs * rowk), v(mla ? 0 : (size_t)NB * bs * rowv), q((size_t)B * Hq * D);
  auto fill = [&](std::vector<T>& x) {
    for (auto& e : x) {
      float f = nd(rng);
      if constexpr (DT == kFloat32) e = f; else e = enc<DT>(f);
    }
  };
  fill(k); fill(v); fill(q);
  std::vector<int32_t> perm(NB);
  for (int i = 0; i < NB; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> bt((size_t)B * maxb);
  for (int i = 0; i < B * maxb; ++i) bt[i] = perm[i];
  std::vector<int32_t> sl(lens.begin(), lens.end());
  std::vector<T> out_gpu((size_t)B * Hq * Dv), out_cpu((size_t)B * Hq * Dv);
  std::vector<float> po((size_t)B * Hq * splits * Dv), pl((size_t)B * Hq * splits);
  attn::DecodeParams p{};
  p.q = q.data(); p.q_sb = (int64_t)Hq * D; p.q_sh = D;
  p.k = k.data(); p.k_sblk = (int64_t)bs * rowk; p.k_stok = rowk; p.k_sh = mla ? rowk : D;
  if (mla) { p.v = k.data(); p.v_sblk = p.k_sblk; p.v_stok = p.k_stok; p.v_sh = p.k_sh; }
  else { p.v = v.data(); p.v_sblk = (int64_t)bs * rowv; p.v_stok = rowv; p.v_sh = Dv; }
  p.block_tables = bt.data(); p.bt_sb = maxb; p.seq_lens = sl.data();
  p.part_o = po.data(); p.part_lse = pl.data(); p.dtype = DT;
  p.B = B; p.Hq = Hq; p.Hkv = mla ? 1 : Hkv; p.D = D; p.Dv = Dv; p.block_size = bs; p.scale = 0.2f;
  p.num_splits = splits; p.chunk = chunk;
  p.out = out_gpu.data();
  int st = paged_decode_cuda(p, nullptr);
  p.out = out_cpu.data();
  int st2 = paged_decode_cpu(p, 2);
  if (st || st2) { printf("status %d %d\n", st, st2); return 1e9; }
  double mx = 0, mag = 0;
  for (size_t i = 0; i < out_gpu.size(); ++i) {
    float a, b;
    if constexpr (DT == kFloat32) { a = out_gpu[i]; b = out_cpu[i]; }
    else if (DT == kFloat16) { a = fp16_to_float(out_gpu[i]); b = fp16_to_float(out_cpu[i]); }
    else { a = bf16_to_float(out_gpu[i]); b = bf16_to_float(out_cpu[i]); }
    if (std::isnan(a) != std::isnan(b)) return 1e9;
    mx = std::max(mx, (double)std::fabs(a - b));
    mag = std::max(mag, (double)std::fabs(b));
  }
  printf("DT%d B%d Hq%d Hkv%d D%d Dv%d bs%d S%d chunk%d mla%d: max|diff| %.3g (max|out| %.3g)\n", DT, B, Hq, Hkv,
         D, Dv, bs, splits, chunk, (int)mla, mx, mag);
  return mx;
}

// cache_write_cuda: rows land at their slots (int32 and int64 slot ids, -1 skipped), nothing else changes.
bool cache_write_ok(int slot_dtype) {
  const int NB = 5, bs = 3, row = 40, N = 6;
  std::vector<uint16_t> src((size_t)N * row), cache((size_t)NB * bs * row, 7);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint16_t>(i + 1);
  const int64_t slots64[N] = {14, -1, 0, 5, -1, 9};
  const int32_t slots32[N] = {14, -1, 0, 5, -1, 9};
  const void* slots = slot_dtype == kInt64 ? static_cast<const void*>(slots64) : static_cast<const void*>(slots32);
  if (cache_write_cuda(src.data(), row, cache.data(), (int64_t)bs * row, row, bs, row, kBFloat16, slots, slot_dtype,
                       N, nullptr))
    return false;
  std::vector<uint16_t> expect((size_t)NB * bs * row, 7);
  for (int n = 0; n < N; ++n)
    if (slots64[n] >= 0)
      for (int i = 0; i < row; ++i) expect[slots64[n] * row + i] = src[(size_t)n * row + i];
  return cache == expect;
}

int main() {
  const bool cw = cache_write_ok(kInt32) && cache_write_ok(kInt64);
  printf("cache_write_cuda: %s\n", cw ? "ok" : "MISMATCH");
  double worst = 0;
  worst = std::max(worst, run_case<kFloat32>(3, 8, 2, 128, 128, 16, {1, 0, 300}, 1, 1024, false));
  worst = std::max(worst, run_case<kFloat32>(3, 8, 2, 128, 128, 17, {1, 0, 300}, 3, 64, false));
  worst = std::max(worst, run_case<kFloat32>(2, 16, 2, 64, 32, 5, {77, 130}, 2, 64, false));
  worst = std::max(worst, run_case<kFloat32>(2, 4, 4, 256, 256, 1, {40, 9}, 1, 64, false));
  worst = std::max(worst, run_case<kFloat32>(2, 12, 2, 64, 128, 64, {200, 65}, 4, 64, false));
  worst = std::max(worst, run_case<kFloat32>(2, 3, 1, 576, 512, 16, {50, 33}, 2, 32, true));
  worst = std::max(worst, run_case<kFloat32>(1, 16, 1, 96, 64, 8, {70}, 1, 64, true));
  worst = std::max(worst, run_case<kFloat32>(2, 6, 2, 576, 512, 16, {40, 3}, 2, 32, false));  // separate V
  double w16 = 0;
  w16 = std::max(w16, run_case<kBFloat16>(3, 32, 8, 128, 128, 16, {1, 0, 100}, 3, 64, false));
  w16 = std::max(w16, run_case<kFloat16>(2, 16, 2, 128, 128, 15, {90, 31}, 2, 64, false));
  w16 = std::max(w16, run_case<kBFloat16>(1, 16, 1, 576, 512, 64, {129}, 1, 64, true));
  printf("WORST fp32 %.3g, 16-bit %.3g\n", worst, w16);
  return (cw && worst < 1e-4 && w16 < 2e-2) ? 0 : 1;
}
