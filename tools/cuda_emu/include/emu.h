// CPU emulation of the CUDA features the kernels in csrc/*.cu use, so the host compiler can run them (tools/cuda_emu,
// tests/test_cuda_emu.py). Faithful where it matters for correctness, loud everywhere else:
//  - each CUDA thread of a block is a fiber (ucontext) on one OS thread; a thread runs until it reaches a barrier or
//    a warp collective, then the next runs. __syncthreads releases when every thread of the block arrived;
//  - warp collectives (__shfl_*_sync, __ballot_sync, __match_any_sync, __all/__any_sync, __syncwarp) complete when
//    all 32 lanes reached one; lanes that disagree on the intrinsic, the mask or the width, a mask that is not the
//    full warp, a lane that exited before a full-mask collective, or a barrier nobody can pass -> the launch fails
//    with a message (cudaGetLastError), never an approximation;
//  - __shared__ variables and dynamic shared memory are per block and poisoned (0xff: NaN / -1) at block start;
//    static shared memory above 48 KiB, dynamic above 48 KiB without cudaFuncSetAttribute, more than 227 KiB, more
//    than 1024 threads, grid.y / grid.z above DSMATH_MAX_GRID_YZ -> launch error (as on an H100);
//  - 16-byte vector loads (__ldg of uint4) check their alignment;
//  - a load or store that faults (SIGSEGV / SIGBUS) ends the launch with "illegal memory access" and the thread that
//    made it, as cudaErrorIllegalAddress would (wild accesses that land in mapped memory are not caught);
//  - atomics are plain read-modify-writes (one OS thread: they cannot tear); blocks run one after another, in
//    forward or reverse order, threads in forward or reverse order (emu_configure), to shake out order assumptions.
// Anything not declared here (inline PTX, __activemask, clock64, cooperative groups, textures...) fails to compile.
#pragma once
#include <setjmp.h>
#include <signal.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#ifndef DSMATH_MAX_GRID_YZ
#define DSMATH_MAX_GRID_YZ 65535
#endif

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint4 {
  uint32_t x, y, z, w;
};
struct uint2 {
  uint32_t x, y;
};
struct float2 {
  float x, y;
};
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return uint4{a, b, c, d}; }

typedef void* cudaStream_t;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {

constexpr int kWarp = 32;
constexpr size_t kStaticSmemMax = 48 * 1024;
constexpr size_t kSmemMax = 227 * 1024;
constexpr size_t kStack = 256 * 1024;

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum State { kReady, kWarpWait, kBlockWait, kDone };
enum Collective { kShfl, kShflXor, kShflUp, kShflDown, kBallot, kMatchAny, kAll, kAny, kSyncWarp };
inline const char* collective_name(int c) {
  static const char* names[] = {"__shfl_sync", "__shfl_xor_sync", "__shfl_up_sync", "__shfl_down_sync",
                                "__ballot_sync", "__match_any_sync", "__all_sync", "__any_sync", "__syncwarp"};
  return names[c];
}

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  dim3 tidx;
  int linear = 0;
  State state = kDone;
  // pending warp collective
  int op = 0, arg = 0, width = kWarp;
  unsigned mask = 0;
  uint64_t val = 0, result = 0;
};

struct Runtime {
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
  ucontext_t sched;
  dim3 grid, block, block_idx;
  std::function<void()> body;
  std::string error;             // first failure of the current launch
  std::string last_error;        // cudaGetLastError
  int last_code = 0;
  uint64_t epoch = 0;            // block counter: shared memory is poisoned per block
  size_t static_smem = 0;        // bytes of __shared__ variables this block touched
  std::vector<unsigned char> dyn_smem;
  std::map<std::string, int> max_dyn_smem;  // cudaFuncSetAttribute, by kernel name
  bool reverse_threads = false, reverse_blocks = false;
  uint64_t switches = 0;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

[[noreturn]] inline void fail(const std::string& msg) { throw Failure(msg); }

inline void yield_to_scheduler() {
  Runtime& r = rt();
  ++r.switches;
  swapcontext(&r.cur->ctx, &r.sched);
}

inline std::string where() {
  const Runtime& r = rt();
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", r.block_idx.x, r.block_idx.y, r.block_idx.z,
                r.cur ? r.cur->tidx.x : 0u, r.cur ? r.cur->tidx.y : 0u, r.cur ? r.cur->tidx.z : 0u);
  return buf;
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "emu: warp collectives move at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// A lane's part of a warp collective: park, let the scheduler complete the collective once all lanes are here.
inline uint64_t collective(int op, unsigned mask, uint64_t val, int arg, int width) {
  Runtime& r = rt();
  Fiber* f = r.cur;
  if (mask != 0xffffffffu) fail(where() + ": " + collective_name(op) + " with a partial mask is not emulated");
  if (width < 1 || width > kWarp || (width & (width - 1)))
    fail(where() + ": " + collective_name(op) + " with width " + std::to_string(width));
  f->op = op;
  f->mask = mask;
  f->val = val;
  f->arg = arg;
  f->width = width;
  f->state = kWarpWait;
  yield_to_scheduler();
  return f->result;
}

// Complete the collective of warp w (all its lanes parked). Returns false when the lanes disagree (a failure).
inline void complete_warp(int w) {
  Runtime& r = rt();
  Fiber* lane = &r.fibers[static_cast<size_t>(w) * kWarp];
  const int op = lane[0].op;
  for (int l = 0; l < kWarp; ++l) {
    if (lane[l].op != op || lane[l].mask != lane[0].mask || lane[l].width != lane[0].width) {
      char buf[256];
      std::snprintf(buf, sizeof buf, "block (%u,%u,%u) warp %d: lanes diverge at warp collectives (lane 0 at %s, "
                    "lane %d at %s)", r.block_idx.x, r.block_idx.y, r.block_idx.z, w, collective_name(op), l,
                    collective_name(lane[l].op));
      fail(buf);
    }
  }
  uint32_t ballot = 0;
  for (int l = 0; l < kWarp; ++l)
    if (lane[l].val) ballot |= 1u << l;
  for (int l = 0; l < kWarp; ++l) {
    const int width = lane[l].width, base = l & ~(width - 1), in = l - base;
    int src = l;
    switch (op) {
      case kShfl: src = base + (lane[l].arg & (width - 1)); break;
      case kShflXor: src = (in ^ lane[l].arg) < width ? base + (in ^ lane[l].arg) : l; break;
      case kShflUp: src = in >= lane[l].arg ? l - lane[l].arg : l; break;
      case kShflDown: src = in + lane[l].arg < width ? l + lane[l].arg : l; break;
      default: break;
    }
    uint64_t res = 0;
    switch (op) {
      case kShfl: case kShflXor: case kShflUp: case kShflDown: res = lane[src].val; break;
      case kBallot: res = ballot; break;
      case kAll: res = ballot == 0xffffffffu; break;
      case kAny: res = ballot != 0; break;
      case kMatchAny:
        for (int m = 0; m < kWarp; ++m)
          if (lane[m].val == lane[l].val) res |= 1ull << m;
        break;
      default: break;
    }
    lane[l].result = res;
  }
  for (int l = 0; l < kWarp; ++l) lane[l].state = kReady;
}

inline void fiber_entry(unsigned lo, unsigned hi) {
  Fiber* f = reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo);
  Runtime& r = rt();
  try {
    r.body();
  } catch (const Failure& e) {
    if (r.error.empty()) r.error = e.what();
  } catch (const std::exception& e) {
    if (r.error.empty()) r.error = where() + ": exception " + e.what();
  }
  f->state = kDone;
  swapcontext(&f->ctx, &r.sched);
}

inline void run_block() {
  Runtime& r = rt();
  const int n = static_cast<int>(r.block.x * r.block.y * r.block.z);
  const int warps = (n + kWarp - 1) / kWarp;
  ++r.epoch;
  r.static_smem = 0;
  std::fill(r.dyn_smem.begin(), r.dyn_smem.end(), 0xff);
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    if (!f.stack) f.stack = static_cast<char*>(std::malloc(kStack));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    const uintptr_t p = reinterpret_cast<uintptr_t>(&f);
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(fiber_entry), 2, static_cast<unsigned>(p & 0xffffffffu),
                static_cast<unsigned>(p >> 32));
    f.linear = i;
    f.tidx = dim3(i % r.block.x, (i / r.block.x) % r.block.y, i / (r.block.x * r.block.y));
    f.state = kReady;
  }
  for (int i = n; i < warps * kWarp; ++i) r.fibers[i].state = kDone;  // lanes past the block: never existed
  for (;;) {
    bool progress = false;
    for (int k = 0; k < n && r.error.empty(); ++k) {
      Fiber& f = r.fibers[r.reverse_threads ? n - 1 - k : k];
      if (f.state != kReady) continue;
      r.cur = &f;
      ++r.switches;
      swapcontext(&r.sched, &f.ctx);
      r.cur = nullptr;
      progress = true;
    }
    if (!r.error.empty()) return;
    int live = 0, at_block = 0, done = 0;
    for (int i = 0; i < n; ++i) {
      live += r.fibers[i].state != kDone;
      at_block += r.fibers[i].state == kBlockWait;
      done += r.fibers[i].state == kDone;
    }
    if (live == 0) return;
    for (int w = 0; w < warps; ++w) {
      Fiber* lane = &r.fibers[static_cast<size_t>(w) * kWarp];
      int waiting = 0, exited = 0;
      for (int l = 0; l < kWarp; ++l) {
        waiting += lane[l].state == kWarpWait;
        exited += lane[l].state == kDone;
      }
      if (waiting == 0) continue;
      if (waiting + exited == kWarp && exited) {
        char buf[200];
        std::snprintf(buf, sizeof buf, "block (%u,%u,%u) warp %d: %d lanes exited before a full-mask %s",
                      r.block_idx.x, r.block_idx.y, r.block_idx.z, w, exited, collective_name(lane[0].op));
        r.error = buf;
        return;
      }
      if (waiting == kWarp) {
        try {
          complete_warp(w);
        } catch (const Failure& e) {
          r.error = e.what();
          return;
        }
        progress = true;
      }
    }
    if (at_block && at_block == live) {
      if (done) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "block (%u,%u,%u): __syncthreads reached after %d threads of the block "
                      "exited", r.block_idx.x, r.block_idx.y, r.block_idx.z, done);
        r.error = buf;
        return;
      }
      for (int i = 0; i < n; ++i) r.fibers[i].state = kReady;
      progress = true;
    }
    if (!progress) {
      char buf[200];
      std::snprintf(buf, sizeof buf, "block (%u,%u,%u): deadlock: %d threads at __syncthreads, %d at warp "
                    "collectives, %d exited", r.block_idx.x, r.block_idx.y, r.block_idx.z, at_block,
                    live - at_block, done);
      r.error = buf;
      return;
    }
  }
}

// Faults inside a launch jump back to it (the fibers' stacks are abandoned and rebuilt by the next launch).
inline sigjmp_buf& fault_jmp() {
  static sigjmp_buf j;
  return j;
}
inline volatile void*& fault_addr() {
  static volatile void* a = nullptr;
  return a;
}
inline void on_fault(int, siginfo_t* si, void*) {
  fault_addr() = si->si_addr;
  siglongjmp(fault_jmp(), 1);
}

inline void set_error(int code, const std::string& msg) {
  Runtime& r = rt();
  if (r.last_code == 0) {
    r.last_code = code;
    r.last_error = msg;
  }
}

// kernel<<<grid, block, smem, stream>>>(args) is rewritten to launch("kernel", grid, block, smem, stream, lambda).
template <typename F>
void launch(const char* fn, dim3 grid, dim3 block, size_t smem, cudaStream_t, F body) {
  Runtime& r = rt();
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  auto it = r.max_dyn_smem.find(fn);
  const size_t dyn_max = it == r.max_dyn_smem.end() ? kStaticSmemMax : static_cast<size_t>(it->second);
  if (threads < 1 || threads > 1024 || grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 0x7fffffffu ||
      grid.y > DSMATH_MAX_GRID_YZ || grid.z > DSMATH_MAX_GRID_YZ) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "invalid configuration: grid (%u,%u,%u) block (%u,%u,%u)", grid.x, grid.y,
                  grid.z, block.x, block.y, block.z);
    set_error(cudaErrorInvalidConfiguration, buf);
    return;
  }
  if (smem > dyn_max || smem > kSmemMax) {
    set_error(cudaErrorInvalidValue, "dynamic shared memory " + std::to_string(smem) + " B above the " +
                                         std::to_string(dyn_max) + " B allowed (cudaFuncSetAttribute)");
    return;
  }
  r.grid = grid;
  r.block = block;
  r.body = std::function<void()>(body);
  r.error.clear();
  r.dyn_smem.assign(smem, 0xff);
  const size_t lanes = (threads + kWarp - 1) / kWarp * kWarp;
  if (r.fibers.size() < lanes) r.fibers.resize(lanes);
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  static std::vector<char> alt(1 << 16);
  stack_t ss{}, old_ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  sigaltstack(&ss, &old_ss);
  struct sigaction sa{}, old_segv{}, old_bus{};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &old_segv);
  sigaction(SIGBUS, &sa, &old_bus);
  int code = cudaErrorLaunchFailure;
  if (sigsetjmp(fault_jmp(), 1) == 0) {
    for (uint64_t k = 0; k < blocks && r.error.empty(); ++k) {
      const uint64_t i = r.reverse_blocks ? blocks - 1 - k : k;
      r.block_idx = dim3(static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                         static_cast<unsigned>(i / (static_cast<uint64_t>(grid.x) * grid.y)));
      run_block();
      if (r.error.empty() && r.static_smem + smem > kSmemMax)
        r.error = "shared memory " + std::to_string(r.static_smem + smem) + " B above the 227 KiB of a block";
    }
  } else {
    char buf[200];
    std::snprintf(buf, sizeof buf, "illegal memory access at %p by %s", const_cast<void*>(fault_addr()),
                  where().c_str());
    r.error = buf;
    r.cur = nullptr;
    code = cudaErrorIllegalAddress;
  }
  sigaction(SIGSEGV, &old_segv, nullptr);
  sigaction(SIGBUS, &old_bus, nullptr);
  sigaltstack(&old_ss, nullptr);
  if (!r.error.empty()) set_error(code, r.error);
}

template <typename T, int Id>
T& shared_var() {
  alignas(16) static T storage;
  static uint64_t epoch = 0;
  Runtime& r = rt();
  if (epoch != r.epoch) {  // first touch in this block: poison, count
    epoch = r.epoch;
    std::memset(static_cast<void*>(&storage), std::is_same_v<std::remove_all_extents_t<T>, bool> ? 1 : 0xff,
                sizeof(T));
    r.static_smem += sizeof(T);
    if (r.static_smem > kStaticSmemMax) fail(where() + ": static __shared__ memory above 48 KiB");
  }
  return storage;
}

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(rt().dyn_smem.data());
}

}  // namespace emu

#define threadIdx (emu::rt().cur->tidx)
#define blockIdx (emu::rt().block_idx)
#define blockDim (emu::rt().block)
#define gridDim (emu::rt().grid)

// ---- barriers and warp collectives
inline void __syncthreads() {
  emu::rt().cur->state = emu::kBlockWait;
  emu::yield_to_scheduler();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::collective(emu::kSyncWarp, mask, 0, 0, 32); }
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return emu::from_bits<T>(emu::collective(emu::kShfl, mask, emu::to_bits(v), src, width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return emu::from_bits<T>(emu::collective(emu::kShflXor, mask, emu::to_bits(v), lane_mask, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return emu::from_bits<T>(emu::collective(emu::kShflUp, mask, emu::to_bits(v), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return emu::from_bits<T>(emu::collective(emu::kShflDown, mask, emu::to_bits(v), static_cast<int>(delta), width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(emu::collective(emu::kBallot, mask, pred != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) { return static_cast<int>(emu::collective(emu::kAll, mask, pred != 0, 0, 32)); }
inline int __any_sync(unsigned mask, int pred) { return static_cast<int>(emu::collective(emu::kAny, mask, pred != 0, 0, 32)); }
template <typename T>
unsigned __match_any_sync(unsigned mask, T v) {
  return static_cast<unsigned>(emu::collective(emu::kMatchAny, mask, emu::to_bits(v), 0, 32));
}

// ---- atomics (one OS thread runs every CUDA thread: a read-modify-write cannot be interleaved)
template <typename T>
T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
T atomicOr(T* p, T v) {
  T old = *p;
  *p = old | v;
  return old;
}
template <typename T>
T atomicMax(T* p, T v) {
  T old = *p;
  *p = old > v ? old : v;
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  T old = *p;
  *p = old < v ? old : v;
  return old;
}
template <typename T>
T atomicExch(T* p, T v) {
  T old = *p;
  *p = v;
  return old;
}
template <typename T>
T atomicCAS(T* p, T cmp, T v) {
  T old = *p;
  if (old == cmp) *p = v;
  return old;
}
inline void __threadfence() {}
inline void __threadfence_block() {}

// ---- loads, bit casts, integer intrinsics
template <typename T>
T __ldg(const T* p) {
  if (sizeof(T) >= 8 && reinterpret_cast<uintptr_t>(p) % sizeof(T))
    emu::fail(emu::where() + ": misaligned " + std::to_string(sizeof(T)) + "-byte load");
  return *p;
}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
inline float __uint_as_float(uint32_t u) { return emu::from_bits<float>(u); }
inline uint32_t __float_as_uint(float f) { return static_cast<uint32_t>(emu::to_bits(f)); }
inline int __float_as_int(float f) { return static_cast<int>(emu::to_bits(f)); }
inline float __int_as_float(int i) { return emu::from_bits<float>(static_cast<uint32_t>(i)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return a < b ? a : b;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a > b ? a : b;
}

// ---- runtime API
inline cudaError_t cudaGetLastError() {
  emu::Runtime& r = emu::rt();
  const cudaError_t e = static_cast<cudaError_t>(r.last_code);
  r.last_code = 0;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t) { return emu::rt().last_error.c_str(); }
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
// cudaFuncSetAttribute(kernel, ...) is rewritten to take the kernel's name.
inline cudaError_t cudaFuncSetAttribute(const char* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > static_cast<int>(emu::kSmemMax))
    return cudaErrorInvalidValue;
  emu::rt().max_dyn_smem[fn] = value;
  return cudaSuccess;
}

// ---- cuda_fp16.h (what the kernels use)
struct __half2 {
  uint16_t x, y;
};
float emu_half_to_float(uint16_t h);  // exact conversion, defined in emu_api.cpp
inline float2 __half22float2(__half2 h) { return float2{emu_half_to_float(h.x), emu_half_to_float(h.y)}; }
