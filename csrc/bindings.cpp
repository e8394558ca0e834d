// pybind11 registration only: every function takes raw pointers (as integers), sizes, strides, dtype codes and a
// CUDA stream handle, so the module never includes torch headers and one build serves every torch version.
// Checks on shapes/dtypes/devices happen in Python (python/dsmath_kernels/); launchers re-check what could make
// a kernel read out of bounds and return a status that becomes a Python exception here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "dsmath/launchers.h"

namespace py = pybind11;
using dsmath::routing::Params;

namespace {

template <typename T>
T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check(int status, const char* op) {
  if (status == dsmath::kOk) return;
  std::string msg = std::string(op) + ": ";
  if (status == dsmath::kBadArgument) msg += "bad argument (rejected by the launcher)";
  else if (status == dsmath::kUnsupported) msg += "unsupported configuration";
  else msg += std::string("CUDA error: ") + dsmath::last_cuda_error();
  throw std::runtime_error(msg);
}

Params route_params(int64_t T, int E, int K, int n_group, int topk_group, int scoring, bool renormalize,
                    float scale) {
  return Params{T, E, K, n_group, topk_group, scoring, renormalize ? 1 : 0, scale};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dsmath kernels (torch-free): CPU kernels and, when compiled, CUDA kernels";

  m.def("build_info", []() {
    py::dict d;
#ifdef DSMATH_WITH_CUDA
    d["cuda_compiled"] = true;
#else
    d["cuda_compiled"] = false;
#endif
    d["cuda_archs"] = std::string(DSMATH_CUDA_ARCHS);
    d["hardware_threads"] = static_cast<int>(std::thread::hardware_concurrency());
    return d;
  });

  m.def(
      "route_topk_cpu",
      [](uintptr_t logits, int dtype, int64_t T, int E, int64_t stride_t, uintptr_t bias, int K, int n_group,
         int topk_group, int scoring, bool renormalize, float scale, uintptr_t weights, uintptr_t ids,
         int num_threads) {
        Params p = route_params(T, E, K, n_group, topk_group, scoring, renormalize, scale);
        py::gil_scoped_release nogil;
        check(dsmath::route_topk_cpu(as_ptr<const void>(logits), dtype, stride_t, as_ptr<const float>(bias), p,
                                     as_ptr<float>(weights), as_ptr<int32_t>(ids), num_threads),
              "route_topk_cpu");
      },
      py::arg("logits"), py::arg("dtype"), py::arg("T"), py::arg("E"), py::arg("stride_t"), py::arg("bias"),
      py::arg("K"), py::arg("n_group"), py::arg("topk_group"), py::arg("scoring"), py::arg("renormalize"),
      py::arg("scale"), py::arg("weights"), py::arg("ids"), py::arg("num_threads"));

#ifdef DSMATH_WITH_CUDA
  m.def(
      "route_topk_cuda",
      [](uintptr_t logits, int dtype, int64_t T, int E, int64_t stride_t, uintptr_t bias, int K, int n_group,
         int topk_group, int scoring, bool renormalize, float scale, uintptr_t weights, uintptr_t ids,
         uintptr_t stream) {
        Params p = route_params(T, E, K, n_group, topk_group, scoring, renormalize, scale);
        check(dsmath::route_topk_cuda(as_ptr<const void>(logits), dtype, stride_t, as_ptr<const float>(bias), p,
                                      as_ptr<float>(weights), as_ptr<int32_t>(ids), as_ptr<void>(stream)),
              "route_topk_cuda");
      },
      py::arg("logits"), py::arg("dtype"), py::arg("T"), py::arg("E"), py::arg("stride_t"), py::arg("bias"),
      py::arg("K"), py::arg("n_group"), py::arg("topk_group"), py::arg("scoring"), py::arg("renormalize"),
      py::arg("scale"), py::arg("weights"), py::arg("ids"), py::arg("stream"));
#endif
}
