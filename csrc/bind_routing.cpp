// pybind11 registration of the routing launchers (route_topk_cpu.cpp, route_topk.cu): route_topk and its replay
// entry point route_weights (gating weights of given expert ids).
#include "dsmath/bind.h"

namespace dsmath {

using routing::Params;

void bind_routing(py::module_& m) {
  m.def(
      "route_topk_cpu",
      [](uintptr_t logits, int dtype, int64_t T, int E, int64_t stride_t, uintptr_t bias, int K, int n_group,
         int topk_group, int scoring, bool renormalize, float scale, uintptr_t weights, uintptr_t ids,
         int num_threads) {
        Params p = route_params(T, E, K, n_group, topk_group, scoring, renormalize, scale);
        py::gil_scoped_release nogil;
        check(route_topk_cpu(as_ptr<const void>(logits), dtype, stride_t, as_ptr<const float>(bias), p,
                                     as_ptr<float>(weights), as_ptr<int32_t>(ids), num_threads),
              "route_topk_cpu");
      },
      py::arg("logits"), py::arg("dtype"), py::arg("T"), py::arg("E"), py::arg("stride_t"), py::arg("bias"),
      py::arg("K"), py::arg("n_group"), py::arg("topk_group"), py::arg("scoring"), py::arg("renormalize"),
      py::arg("scale"), py::arg("weights"), py::arg("ids"), py::arg("num_threads"));

  m.def(
      "route_weights_cpu",
      [](uintptr_t logits, int dtype, int64_t T, int E, int64_t stride_t, uintptr_t ids, int K, int scoring,
         bool renormalize, float scale, uintptr_t weights, int num_threads) {
        Params p = route_params(T, E, K, 1, 1, scoring, renormalize, scale);
        py::gil_scoped_release nogil;
        check(route_weights_cpu(as_ptr<const void>(logits), dtype, stride_t, as_ptr<const int32_t>(ids), p,
                                as_ptr<float>(weights), num_threads),
              "route_weights_cpu");
      },
      py::arg("logits"), py::arg("dtype"), py::arg("T"), py::arg("E"), py::arg("stride_t"), py::arg("ids"),
      py::arg("K"), py::arg("scoring"), py::arg("renormalize"), py::arg("scale"), py::arg("weights"),
      py::arg("num_threads"));

#ifdef DSMATH_WITH_CUDA
  m.def(
      "route_weights_cuda",
      [](uintptr_t logits, int dtype, int64_t T, int E, int64_t stride_t, uintptr_t ids, int K, int scoring,
         bool renormalize, float scale, uintptr_t weights, uintptr_t stream) {
        Params p = route_params(T, E, K, 1, 1, scoring, renormalize, scale);
        check(route_weights_cuda(as_ptr<const void>(logits), dtype, stride_t, as_ptr<const int32_t>(ids), p,
                                 as_ptr<float>(weights), as_ptr<void>(stream)),
              "route_weights_cuda");
      },
      py::arg("logits"), py::arg("dtype"), py::arg("T"), py::arg("E"), py::arg("stride_t"), py::arg("ids"),
      py::arg("K"), py::arg("scoring"), py::arg("renormalize"), py::arg("scale"), py::arg("weights"),
      py::arg("stream"));

  m.def(
      "route_topk_cuda",
      [](uintptr_t logits, int dtype, int64_t T, int E, int64_t stride_t, uintptr_t bias, int K, int n_group,
         int topk_group, int scoring, bool renormalize, float scale, uintptr_t weights, uintptr_t ids,
         uintptr_t stream) {
        Params p = route_params(T, E, K, n_group, topk_group, scoring, renormalize, scale);
        check(route_topk_cuda(as_ptr<const void>(logits), dtype, stride_t, as_ptr<const float>(bias), p,
                                      as_ptr<float>(weights), as_ptr<int32_t>(ids), as_ptr<void>(stream)),
              "route_topk_cuda");
      },
      py::arg("logits"), py::arg("dtype"), py::arg("T"), py::arg("E"), py::arg("stride_t"), py::arg("bias"),
      py::arg("K"), py::arg("n_group"), py::arg("topk_group"), py::arg("scoring"), py::arg("renormalize"),
      py::arg("scale"), py::arg("weights"), py::arg("ids"), py::arg("stream"));
#endif
}

}  // namespace dsmath
