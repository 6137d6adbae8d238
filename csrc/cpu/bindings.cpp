// pybind11 bindings of the CPU kernels. Tensors cross as raw data pointers (uintptr_t) plus sizes: the Python side
// (kc_kernels) checks dtype, contiguity and device before calling, so no torch headers are needed here.
#include <pybind11/pybind11.h>

#include "cpu/kc_cpu.h"

namespace py = pybind11;

template <typename T>
static T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "kc CPU kernels (C++17, OpenMP)";
  m.def(
      "row_softplus_sum",
      [](std::uintptr_t x, std::uintptr_t out, int64_t rows, int64_t cols) {
        py::gil_scoped_release nogil;
        kc_cpu::row_softplus_sum(ptr<const float>(x), ptr<float>(out), rows, cols);
      },
      py::arg("x"), py::arg("out"), py::arg("rows"), py::arg("cols"));
  m.def(
      "row_logsumexp",
      [](std::uintptr_t x, std::uintptr_t out, int64_t rows, int64_t cols) {
        py::gil_scoped_release nogil;
        kc_cpu::row_logsumexp(ptr<const float>(x), ptr<float>(out), rows, cols);
      },
      py::arg("x"), py::arg("out"), py::arg("rows"), py::arg("cols"));
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
