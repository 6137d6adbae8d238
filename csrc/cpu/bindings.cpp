// pybind11 bindings of the CPU kernels. Tensors cross as raw data pointers (uintptr_t) plus sizes: the Python side
// (kc_kernels) checks dtype, contiguity and device before calling, so no torch headers are needed here.
#include <pybind11/pybind11.h>

#include "common/pybind_layout.h"
#include "cpu/kc_cpu.h"

namespace py = pybind11;

template <typename T>
static T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "kc CPU kernels (C++17, OpenMP)";
  m.def(
      "soft_target_chunk",
      [](std::uintptr_t u, int64_t ld, int64_t rows, int64_t ncols, int64_t col0, int64_t npieces,
         std::uintptr_t piece_lo, std::uintptr_t piece_seg, int64_t num_segments, int phases, int softmax,
         float inv_t, float t2, std::uintptr_t scale, int scale_kind, std::uintptr_t tidx, std::uintptr_t tval,
         int64_t k, std::uintptr_t teacher, int64_t teacher_ld, std::uintptr_t coef, std::uintptr_t state,
         std::uintptr_t softplus_sum, std::uintptr_t dscale_class, std::uintptr_t bias, std::uintptr_t dbias) {
        kc_cpu::SoftTargetChunk a{ptr<float>(u),           ld,
                                  rows,                    ncols,
                                  col0,                    npieces,
                                  ptr<const int64_t>(piece_lo), ptr<const int64_t>(piece_seg),
                                  num_segments,            phases,
                                  softmax,                 inv_t,
                                  t2,                      ptr<const float>(scale),
                                  scale_kind,              ptr<const int64_t>(tidx),
                                  ptr<const float>(tval),  k,
                                  ptr<const float>(teacher), teacher_ld,
                                  ptr<const float>(coef),  ptr<double>(state),
                                  ptr<double>(softplus_sum), ptr<float>(dscale_class),
                                  ptr<const float>(bias),  ptr<float>(dbias)};
        py::gil_scoped_release nogil;
        kc_cpu::soft_target_chunk(a);
      },
      "Fused soft-target epilogue over one chunk of logits (see csrc/cpu/soft_target.cpp). Pointers are raw "
      "addresses; 0 means absent.");
  kc::export_soft_target_layout(m);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
