// Per-thread last CUDA error message, set by launchers and read by the bindings when a launch fails.
#include "dsmath/launchers.h"

namespace dsmath {
namespace {
thread_local const char* g_last_error = "";
}
const char* last_cuda_error() { return g_last_error; }
void set_last_cuda_error(const char* msg) { g_last_error = msg ? msg : ""; }
}  // namespace dsmath
