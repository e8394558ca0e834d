// Declarations of every launcher the bindings expose. Each returns a dsmath::Status; pointers are raw device or
// host addresses handed over from Python, strides are in elements, streams are cudaStream_t passed as integers.
#pragma once
#include <cstdint>

#include "dsmath/common.h"
#include "dsmath/routing.h"
#include "dsmath/attention.h"
#include "dsmath/cascade.h"

namespace dsmath {

// ---- routing (route_topk_cpu.cpp, route_topk.cu)
int route_topk_cpu(const void* logits, int dtype, int64_t stride_t, const float* bias, const routing::Params& p,
                   float* weights, int32_t* ids, int num_threads);
int route_topk_cuda(const void* logits, int dtype, int64_t stride_t, const float* bias, const routing::Params& p,
                    float* weights, int32_t* ids, void* stream);
// Replay: gating weights [T, K] of the given expert ids [T, K] (int32, row-major); p.n_group / topk_group unused.
int route_weights_cpu(const void* logits, int dtype, int64_t stride_t, const int32_t* ids,
                      const routing::Params& p, float* weights, int num_threads);
int route_weights_cuda(const void* logits, int dtype, int64_t stride_t, const int32_t* ids,
                       const routing::Params& p, float* weights, void* stream);

// ---- attention (attn_decode_cpu.cpp, attn_decode.cu, attn_cache.cu): paged KV cache decode and writes
int paged_decode_cpu(const attn::DecodeParams& p, int num_threads);
int paged_decode_cuda(const attn::DecodeParams& p, void* stream);
// Copy N rows of `row` elements (src row stride src_s) into cache rows at slots (int32/int64 by slot_dtype); slots
// outside [-1, num_slots) are skipped and set kBadSlot in flags (may be null).
int cache_write_cuda(const void* src, int64_t src_s, void* cache, int64_t s_blk, int64_t s_tok, int block_size,
                     int64_t row, int dtype, const void* slots, int slot_dtype, int64_t N, int64_t num_slots,
                     int32_t* flags, void* stream);

// ---- tiled / shared-prefix decode (attn_cascade_cpu.cpp; parameters in dsmath/cascade.h)
int attend_cpu(const attn::AttendParams& p, int num_threads);
const char* attend_cpu_isa(int engine);
// out [rows, Dv] (dtype) <- log-sum-exp merge of part_o [rows, nslot, Dv] / part_lse [rows, nslot]; -inf slots unread.
int merge_partials_cpu(const float* part_o, const float* part_lse, void* out, int dtype, int64_t rows, int nslot,
                       int Dv, int num_threads);

// ---- moe (moe_permute_cpu.cpp, moe_permute.cu; layout in python/dsmath_kernels/moe.py, sizes in dsmath/moe.h)
int moe_permute_cpu(const int32_t* ids, int64_t P, int E, int block_m, int32_t* order, int32_t* offsets,
                    int32_t* inverse);
// CUDA: ids outside [0, E) are skipped (inverse = -1) and set kBadExpertId in flags (may be null).
int moe_permute_cuda(const int32_t* ids, int64_t P, int E, int block_m, int32_t* order, int32_t* offsets,
                     int32_t* inverse, int32_t* workspace, int32_t* flags, void* stream);

// CUDA error string of the last failed launch on this thread ("" when none); errors.cpp.
const char* last_cuda_error();
void set_last_cuda_error(const char* msg);

}  // namespace dsmath
