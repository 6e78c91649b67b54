// The one pybind11 bindings file: converts Python buffers to raw pointers, checks every
// argument (raising ValueError/TypeError that name it), then calls the framework-free core.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>

#include "core/info.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mirror_rt C++ operators (CPU) for the draft's streaming step";
  m.attr("abi_version") = mirror_rt::kCoreAbiVersion;
  m.def("openmp_max_threads", &mirror_rt::openmp_max_threads, "OpenMP threads the core may use");
}
