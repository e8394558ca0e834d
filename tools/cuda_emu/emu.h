// Minimal CPU emulation of the CUDA features attn_decode.cu / attn_cache.cu use: one block at a time, one
// std::thread per CUDA thread, __syncthreads via a block barrier, warp shuffles via a per-warp exchange + barrier.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>
#include <cstdio>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__

struct dim3 { unsigned x = 1, y = 1, z = 1; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct uint4 { uint32_t x, y, z, w; };
struct uint2 { uint32_t x, y; };
struct float2 { float x, y; };
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return uint4{a, b, c, d}; }
typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr int cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return 0; }
inline const char* cudaGetErrorString(cudaError_t) { return "emu"; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
template <typename T> inline T __ldg(const T* p) { return *p; }
using std::min; using std::max;

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;

namespace emu {
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
inline float xch[1024];
}
inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline void __syncwarp() { emu::warp_bars[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int off) {
  const int t = threadIdx.x, w = t / 32;
  emu::xch[t] = v;
  emu::warp_bars[w]->arrive_and_wait();
  float r = emu::xch[(t & ~31) | ((t & 31) ^ off)];
  emu::warp_bars[w]->arrive_and_wait();
  return r;
}
struct __half2 { uint16_t x, y; };
float fp16_to_float_emu(uint16_t h);
inline float2 __half22float2(__half2 h) { return float2{fp16_to_float_emu(h.x), fp16_to_float_emu(h.y)}; }

namespace emu {
template <typename K, typename... A>
void launch(dim3 grid, int block, int smem, cudaStream_t, K kernel, A... args) {
  (void)smem;
  gridDim = grid;
  blockDim = dim3(block);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block_bar = std::make_unique<std::barrier<>>(block);
        warp_bars.clear();
        for (int w = 0; w < block / 32; ++w) warp_bars.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> ts;
        for (int t = 0; t < block; ++t)
          ts.emplace_back([=]() {
            threadIdx = dim3(t);
            blockIdx = dim3(x, y, z);
            kernel(args...);
          });
        for (auto& th : ts) th.join();
      }
}
}  // namespace emu
