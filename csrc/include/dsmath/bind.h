// Shared helpers for the bind_*.cpp files (host only, pybind11, no torch).
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "dsmath/flat.h"
#include "dsmath/launchers.h"

namespace py = pybind11;

namespace dsmath {

// Turn a launcher status into a Python RuntimeError naming the op.
inline void check(int status, const char* op) {
  if (status == kOk) return;
  std::string msg = std::string(op) + ": ";
  if (status == kBadArgument) msg += "bad argument (rejected by the launcher)";
  else if (status == kUnsupported) msg += "unsupported configuration";
  else msg += std::string("CUDA error: ") + last_cuda_error();
  throw std::runtime_error(msg);
}

// One registration function per op family, each in csrc/bind_<family>.cpp.
void bind_routing(py::module_& m);
void bind_moe(py::module_& m);        // token permutation for the MoE expert layer
void bind_attention(py::module_& m);  // paged KV cache: writes, decode, MLA decode
void bind_cascade(py::module_& m);    // tiled and shared-prefix (cascade) decode on CPU

}  // namespace dsmath
