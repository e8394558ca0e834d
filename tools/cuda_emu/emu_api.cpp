// C entry points of the emulated CUDA launchers (csrc/*.cu compiled by the host compiler under include/emu.h), for
// ctypes (tools/cuda_emu/emu.py). Argument lists follow the pybind11 bindings (csrc/bind_*.cpp, dsmath/flat.h);
// streams are null. Each returns the launcher's dsmath::Status; emu_last_error() gives the failure text.
#include <string>

#include "emu.h"
#include "dsmath/flat.h"
#include "dsmath/launchers.h"
#include "dsmath/moe.h"

float emu_half_to_float(uint16_t h) { return dsmath::fp16_to_float(h); }

namespace dsmath {
// Per-thread last CUDA error (errors.cpp is not part of the emulation library).
namespace {
std::string g_error;
}
const char* last_cuda_error() { return g_error.c_str(); }
void set_last_cuda_error(const char* msg) { g_error = msg ? msg : ""; }
}  // namespace dsmath

namespace dsmath {  // weak: a library built from a subset of the .cu files (tests of the emulation) still links
int route_topk_cuda(const void*, int, int64_t, const float*, const routing::Params&, float*, int32_t*, void*)
    __attribute__((weak));
int route_weights_cuda(const void*, int, int64_t, const int32_t*, const routing::Params&, float*, void*)
    __attribute__((weak));
int moe_permute_cuda(const int32_t*, int64_t, int, int, int32_t*, int32_t*, int32_t*, int32_t*, int32_t*, void*)
    __attribute__((weak));
int cache_write_cuda(const void*, int64_t, void*, int64_t, int64_t, int, int64_t, int, const void*, int, int64_t,
                     int64_t, int32_t*, void*) __attribute__((weak));
int paged_decode_cuda(const attn::DecodeParams&, void*) __attribute__((weak));
}  // namespace dsmath

using namespace dsmath;
constexpr int kMissing = -1;  // the library was built without this launcher's .cu file

extern "C" {

const char* emu_last_error() { return dsmath::last_cuda_error(); }

// Message of the last failed launch as the emulation saw it (also for kernels launched outside the launchers).
const char* emu_launch_message() { return emu::rt().last_error.c_str(); }

void emu_configure(int reverse_threads, int reverse_blocks) {
  emu::rt().reverse_threads = reverse_threads != 0;
  emu::rt().reverse_blocks = reverse_blocks != 0;
}

long long emu_switches() { return static_cast<long long>(emu::rt().switches); }

int emu_max_grid_yz() { return DSMATH_MAX_GRID_YZ; }

int emu_route_topk(uintptr_t logits, int dtype, int64_t T, int E, int64_t stride_t, uintptr_t bias, int K,
                   int n_group, int topk_group, int scoring, int renormalize, float scale, uintptr_t weights,
                   uintptr_t ids) {
  set_last_cuda_error("");
  if (!&route_topk_cuda) return kMissing;
  routing::Params p = route_params(T, E, K, n_group, topk_group, scoring, renormalize != 0, scale);
  return route_topk_cuda(as_ptr<const void>(logits), dtype, stride_t, as_ptr<const float>(bias), p,
                         as_ptr<float>(weights), as_ptr<int32_t>(ids), nullptr);
}

int emu_route_weights(uintptr_t logits, int dtype, int64_t T, int E, int64_t stride_t, uintptr_t ids, int K,
                      int scoring, int renormalize, float scale, uintptr_t weights) {
  set_last_cuda_error("");
  if (!&route_weights_cuda) return kMissing;
  routing::Params p = route_params(T, E, K, 1, 1, scoring, renormalize != 0, scale);
  return route_weights_cuda(as_ptr<const void>(logits), dtype, stride_t, as_ptr<const int32_t>(ids), p,
                            as_ptr<float>(weights), nullptr);
}

long long emu_moe_workspace(int64_t P, int E) { return moe::workspace_ints(P, E); }

int emu_moe_permute(uintptr_t ids, int64_t P, int E, int block_m, uintptr_t order, uintptr_t offsets,
                    uintptr_t inverse, uintptr_t workspace, uintptr_t flags) {
  set_last_cuda_error("");
  if (!&moe_permute_cuda) return kMissing;
  return moe_permute_cuda(as_ptr<const int32_t>(ids), P, E, block_m, as_ptr<int32_t>(order),
                          as_ptr<int32_t>(offsets), as_ptr<int32_t>(inverse), as_ptr<int32_t>(workspace),
                          as_ptr<int32_t>(flags), nullptr);
}

int emu_cache_write(uintptr_t src, int64_t src_s, uintptr_t cache, int64_t s_blk, int64_t s_tok, int block_size,
                    int64_t row, int dtype, uintptr_t slots, int slot_dtype, int64_t N, int64_t num_slots,
                    uintptr_t flags) {
  set_last_cuda_error("");
  if (!&cache_write_cuda) return kMissing;
  return cache_write_cuda(as_ptr<const void>(src), src_s, as_ptr<void>(cache), s_blk, s_tok, block_size, row, dtype,
                          as_ptr<const void>(slots), slot_dtype, N, num_slots, as_ptr<int32_t>(flags), nullptr);
}

int emu_paged_decode(DSM_DECODE_ARGS) {
  set_last_cuda_error("");
  if (!&paged_decode_cuda) return kMissing;
  return paged_decode_cuda(decode_params(DSM_DECODE_PASS), nullptr);
}

}  // extern "C"
