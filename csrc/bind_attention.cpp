// pybind11 registration of the attention launchers (attn_decode_cpu.cpp, attn_decode.cu, attn_cache.cu).
#include "dsmath/bind.h"

namespace dsmath {

// Argument order shared by paged_decode_cpu / paged_decode_cuda (python/dsmath_kernels/attention.py builds it).
static attn::DecodeParams decode_params(uintptr_t q, int64_t q_sb, int64_t q_sh, uintptr_t k, int64_t k_sblk,
                                        int64_t k_stok, int64_t k_sh, uintptr_t v, int64_t v_sblk, int64_t v_stok,
                                        int64_t v_sh, uintptr_t bt, int64_t bt_sb, uintptr_t seq_lens, uintptr_t out,
                                        uintptr_t part_o, uintptr_t part_lse, int dtype, int B, int Hq, int Hkv,
                                        int D, int Dv, int block_size, float scale, int num_splits, int chunk) {
  return attn::DecodeParams{as_ptr<const void>(q), q_sb, q_sh, as_ptr<const void>(k), k_sblk, k_stok, k_sh,
                            as_ptr<const void>(v), v_sblk, v_stok, v_sh, as_ptr<const int32_t>(bt), bt_sb,
                            as_ptr<const int32_t>(seq_lens), as_ptr<void>(out), as_ptr<float>(part_o),
                            as_ptr<float>(part_lse), dtype, B, Hq, Hkv, D, Dv, block_size, scale, num_splits,
                            chunk};
}

#define DSM_DECODE_ARGS                                                                                          \
  uintptr_t q, int64_t q_sb, int64_t q_sh, uintptr_t k, int64_t k_sblk, int64_t k_stok, int64_t k_sh, uintptr_t v, \
      int64_t v_sblk, int64_t v_stok, int64_t v_sh, uintptr_t bt, int64_t bt_sb, uintptr_t seq_lens,             \
      uintptr_t out, uintptr_t part_o, uintptr_t part_lse, int dtype, int B, int Hq, int Hkv, int D, int Dv,      \
      int block_size, float scale, int num_splits, int chunk
#define DSM_DECODE_PASS                                                                                          \
  q, q_sb, q_sh, k, k_sblk, k_stok, k_sh, v, v_sblk, v_stok, v_sh, bt, bt_sb, seq_lens, out, part_o, part_lse, \
      dtype, B, Hq, Hkv, D, Dv, block_size, scale, num_splits, chunk

void bind_attention(py::module_& m) {
  m.def("paged_decode_cpu", [](DSM_DECODE_ARGS, int num_threads) {
    attn::DecodeParams p = decode_params(DSM_DECODE_PASS);
    py::gil_scoped_release nogil;
    check(paged_decode_cpu(p, num_threads), "paged_decode_cpu");
  });
#ifdef DSMATH_WITH_CUDA
  m.def("paged_decode_cuda", [](DSM_DECODE_ARGS, uintptr_t stream) {
    check(paged_decode_cuda(decode_params(DSM_DECODE_PASS), as_ptr<void>(stream)), "paged_decode_cuda");
  });
  m.def("cache_write_cuda", [](uintptr_t src, int64_t src_s, uintptr_t cache, int64_t s_blk, int64_t s_tok,
                               int block_size, int64_t row, int dtype, uintptr_t slots, int slot_dtype, int64_t N,
                               uintptr_t stream) {
    check(cache_write_cuda(as_ptr<const void>(src), src_s, as_ptr<void>(cache), s_blk, s_tok, block_size, row, dtype,
                           as_ptr<const void>(slots), slot_dtype, N, as_ptr<void>(stream)),
          "cache_write_cuda");
  });
#endif
}

#undef DSM_DECODE_ARGS
#undef DSM_DECODE_PASS

}  // namespace dsmath
