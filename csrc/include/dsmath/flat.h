// Flat argument lists (integers for pointers, sizes, strides, dtype codes) of the launchers whose parameters travel
// in a struct, shared by the pybind11 bindings (bind_*.cpp) and the C entry points of the CPU emulation of the CUDA
// files (tools/cuda_emu/emu_api.cpp), so both build the structs the same way. Torch-free, pybind11-free.
#pragma once
#include <cstdint>

#include "dsmath/attention.h"
#include "dsmath/routing.h"

namespace dsmath {

template <typename T>
inline T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

inline routing::Params route_params(int64_t T, int E, int K, int n_group, int topk_group, int scoring,
                                    bool renormalize, float scale) {
  return routing::Params{T, E, K, n_group, topk_group, scoring, renormalize ? 1 : 0, scale};
}

// Argument order shared by paged_decode_cpu / paged_decode_cuda (python/dsmath_kernels/attention.py builds it).
#define DSM_DECODE_ARGS                                                                                          \
  uintptr_t q, int64_t q_sb, int64_t q_sh, uintptr_t k, int64_t k_sblk, int64_t k_stok, int64_t k_sh, uintptr_t v, \
      int64_t v_sblk, int64_t v_stok, int64_t v_sh, uintptr_t bt, int64_t bt_sb, uintptr_t seq_lens,             \
      uintptr_t out, uintptr_t part_o, uintptr_t part_lse, int dtype, int B, int Hq, int Hkv, int D, int Dv,      \
      int block_size, float scale, int num_splits, int chunk, int max_blocks, int num_blocks, uintptr_t flags
#define DSM_DECODE_PASS                                                                                          \
  q, q_sb, q_sh, k, k_sblk, k_stok, k_sh, v, v_sblk, v_stok, v_sh, bt, bt_sb, seq_lens, out, part_o, part_lse, \
      dtype, B, Hq, Hkv, D, Dv, block_size, scale, num_splits, chunk, max_blocks, num_blocks, flags

inline attn::DecodeParams decode_params(DSM_DECODE_ARGS) {
  return attn::DecodeParams{as_ptr<const void>(q), q_sb, q_sh, as_ptr<const void>(k), k_sblk, k_stok, k_sh,
                            as_ptr<const void>(v), v_sblk, v_stok, v_sh, as_ptr<const int32_t>(bt), bt_sb,
                            as_ptr<const int32_t>(seq_lens), as_ptr<void>(out), as_ptr<float>(part_o),
                            as_ptr<float>(part_lse), dtype, B, Hq, Hkv, D, Dv, block_size, scale, num_splits,
                            chunk, max_blocks, num_blocks, as_ptr<int32_t>(flags)};
}

}  // namespace dsmath
