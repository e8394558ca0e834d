// Torch-free shared definitions for dsmath kernels: host/device macros, dtype codes, status codes and
// portable fp16/bf16 <-> fp32 conversions usable from both the C++ CPU kernels and the CUDA kernels.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DSM_HD __host__ __device__ __forceinline__
#else
#define DSM_HD inline
#endif

namespace dsmath {

// Dtype codes passed from Python (python/dsmath_kernels/_ext.py keeps the same table).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt32 = 3, kInt64 = 4, kFloat64 = 5 };

// Status codes returned by launchers; Python turns non-zero codes into exceptions.
enum Status : int { kOk = 0, kBadArgument = 1, kUnsupported = 2, kCudaError = 3 };

// Device-side bounds flags (bits of an int32 the caller passes; python/dsmath_kernels/_ext.py names them). A kernel
// that meets an out-of-range block id / length / slot / expert id treats it as empty, sets its bit and goes on:
// no trap, no host sync. DSMATH_CHECK_BOUNDS=1 makes Python read the flag after the call and raise.
enum BoundsFlag : int { kBadBlockId = 1, kBadSeqLen = 2, kBadSlot = 4, kBadExpertId = 8, kBadMaxSeqlenQ = 16 };

// Largest grid.y / grid.z of a launch (CUDA's limit); launchers split larger batches into several launches. The CPU
// emulation of the CUDA files (tools/cuda_emu) lowers it to test the split.
#ifndef DSMATH_MAX_GRID_YZ
#define DSMATH_MAX_GRID_YZ 65535
#endif

DSM_HD void set_flag(int32_t* flags, int bit) {
  if (!flags) return;
#if defined(__CUDA_ARCH__)
  atomicOr(flags, bit);
#else
  __atomic_fetch_or(flags, bit, __ATOMIC_RELAXED);
#endif
}

DSM_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, 4);
  return f;
#endif
}

DSM_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
#endif
}

// bfloat16 is the top half of an IEEE float.
DSM_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round-to-nearest-even fp32 -> bf16 (NaN stays NaN).
DSM_HD uint16_t float_to_bf16(float f) {
  uint32_t b = float_to_bits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40);
  b += 0x7fffu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

// IEEE half -> float, exact for every input (normals, subnormals, inf, NaN).
DSM_HD float fp16_to_float(uint16_t h) {
  uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal: man * 2^-24
    float v = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// Load element i of a float-like array of the given dtype as fp32.
DSM_HD float load_as_float(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case kFloat32: return static_cast<const float*>(p)[i];
    case kFloat16: return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
    case kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    case kFloat64: return static_cast<float>(static_cast<const double*>(p)[i]);
    default: return 0.f;
  }
}

}  // namespace dsmath
