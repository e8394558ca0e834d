// pybind11 registration of the moe launchers.
#include "dsmath/bind.h"

namespace dsmath {

void bind_moe(py::module_& m) { (void)m; }

}  // namespace dsmath
