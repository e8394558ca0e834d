// pybind11 registration of the attention launchers (attn_decode_cpu.cpp, attn_decode.cu, attn_cache.cu).
#include "dsmath/bind.h"

namespace dsmath {

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
                               int64_t num_slots, uintptr_t flags, uintptr_t stream) {
    check(cache_write_cuda(as_ptr<const void>(src), src_s, as_ptr<void>(cache), s_blk, s_tok, block_size, row, dtype,
                           as_ptr<const void>(slots), slot_dtype, N, num_slots, as_ptr<int32_t>(flags),
                           as_ptr<void>(stream)),
          "cache_write_cuda");
  });
#endif
}

}  // namespace dsmath
