// Declarations of every launcher the bindings expose. Each returns a dsmath::Status; pointers are raw device or
// host addresses handed over from Python, strides are in elements, streams are cudaStream_t passed as integers.
#pragma once
#include <cstdint>

#include "dsmath/common.h"
#include "dsmath/routing.h"

namespace dsmath {

// ---- routing (route_topk_cpu.cpp, route_topk.cu)
int route_topk_cpu(const void* logits, int dtype, int64_t stride_t, const float* bias, const routing::Params& p,
                   float* weights, int32_t* ids, int num_threads);
int route_topk_cuda(const void* logits, int dtype, int64_t stride_t, const float* bias, const routing::Params& p,
                    float* weights, int32_t* ids, void* stream);

// CUDA error string of the last failed launch on this thread ("" when none); errors.cpp.
const char* last_cuda_error();
void set_last_cuda_error(const char* msg);

}  // namespace dsmath
