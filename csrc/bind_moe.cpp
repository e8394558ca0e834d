// pybind11 registration of the moe launchers (moe_permute_cpu.cpp, moe_permute.cu).
#include "dsmath/bind.h"
#include "dsmath/moe.h"

namespace dsmath {

void bind_moe(py::module_& m) {
  m.def("moe_permute_workspace", [](int64_t P, int E) { return moe::workspace_ints(P, E); }, py::arg("P"),
        py::arg("E"));
  m.attr("moe_max_experts_cuda") = moe::kMaxExperts;
  m.def(
      "moe_permute_cpu",
      [](uintptr_t ids, int64_t P, int E, int block_m, uintptr_t order, uintptr_t offsets, uintptr_t inverse) {
        py::gil_scoped_release nogil;
        check(moe_permute_cpu(as_ptr<const int32_t>(ids), P, E, block_m, as_ptr<int32_t>(order),
                              as_ptr<int32_t>(offsets), as_ptr<int32_t>(inverse)),
              "moe_permute_cpu");
      },
      py::arg("ids"), py::arg("P"), py::arg("E"), py::arg("block_m"), py::arg("order"), py::arg("offsets"),
      py::arg("inverse"));
#ifdef DSMATH_WITH_CUDA
  m.def(
      "moe_permute_cuda",
      [](uintptr_t ids, int64_t P, int E, int block_m, uintptr_t order, uintptr_t offsets, uintptr_t inverse,
         uintptr_t workspace, uintptr_t flags, uintptr_t stream) {
        check(moe_permute_cuda(as_ptr<const int32_t>(ids), P, E, block_m, as_ptr<int32_t>(order),
                               as_ptr<int32_t>(offsets), as_ptr<int32_t>(inverse), as_ptr<int32_t>(workspace),
                               as_ptr<int32_t>(flags), as_ptr<void>(stream)),
              "moe_permute_cuda");
      },
      py::arg("ids"), py::arg("P"), py::arg("E"), py::arg("block_m"), py::arg("order"), py::arg("offsets"),
      py::arg("inverse"), py::arg("workspace"), py::arg("flags"), py::arg("stream"));
#endif
}

}  // namespace dsmath
