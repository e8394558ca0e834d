// pybind11 module `dsmath_kernels._C`: registration only. Every function takes raw pointers (as integers),
// sizes, strides, dtype codes and a CUDA stream handle, so the module never includes torch headers and one build
// serves every torch version. Shapes/dtypes/devices are checked in Python (python/dsmath_kernels/); launchers
// re-check what could make a kernel read out of bounds and return a status that bind.h turns into an exception.
// Each op family registers itself from its own bind_<family>.cpp.
#include <thread>

#include "dsmath/bind.h"

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
  dsmath::bind_routing(m);
  dsmath::bind_moe(m);
  dsmath::bind_attention(m);
  dsmath::bind_cascade(m);
}
