// pybind11 bindings of the CUDA launchers. Compiled by the host compiler; only kc_cuda.h is seen here, so neither
// CUDA nor torch headers are needed. Pointers and the stream cross as integers (tensor.data_ptr(),
// torch.cuda.current_stream().cuda_stream).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cuda/kc_cuda.h"

namespace py = pybind11;

static void check(int code, const char* what) {
  if (code != 0) throw std::runtime_error(std::string(what) + ": " + kc_cuda::error_string(code));
}

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "kc CUDA kernels (nvcc-compiled, raw-pointer launchers)";
  m.def(
      "row_logsumexp",
      [](std::uintptr_t x, std::uintptr_t out, int64_t rows, int64_t cols, std::uintptr_t stream) {
        check(kc_cuda::row_logsumexp(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(out), rows, cols,
                                     reinterpret_cast<void*>(stream)),
              "row_logsumexp");
      },
      py::arg("x"), py::arg("out"), py::arg("rows"), py::arg("cols"), py::arg("stream"));
  m.def(
      "row_softplus_sum",
      [](std::uintptr_t x, std::uintptr_t out, int64_t rows, int64_t cols, std::uintptr_t stream) {
        check(kc_cuda::row_softplus_sum(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(out), rows, cols,
                                        reinterpret_cast<void*>(stream)),
              "row_softplus_sum");
      },
      py::arg("x"), py::arg("out"), py::arg("rows"), py::arg("cols"), py::arg("stream"));
  m.def("device_count", &kc_cuda::device_count,
        "Visible CUDA devices, or a negative cudaError_t when the runtime cannot start");
  m.def("error_string", &kc_cuda::error_string);
}
