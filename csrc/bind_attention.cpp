// pybind11 registration of the attention launchers.
#include "dsmath/bind.h"

namespace dsmath {

void bind_attention(py::module_& m) { (void)m; }

}  // namespace dsmath
