// Launch-status helper shared by the CUDA launchers: turns the last CUDA error into a dsmath::Status and keeps
// its message for the bindings (launchers.h: last_cuda_error).
#pragma once
#include <cuda_runtime.h>

#include "dsmath/launchers.h"

namespace dsmath {

inline int cuda_status(cudaError_t err) {
  if (err == cudaSuccess) return kOk;
  set_last_cuda_error(cudaGetErrorString(err));
  return kCudaError;
}

// Status of the kernel launches issued so far on this thread (no synchronisation).
inline int launch_status() { return cuda_status(cudaGetLastError()); }

}  // namespace dsmath
