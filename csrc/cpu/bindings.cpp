// pybind11 bindings of the CPU kernels. The kernel's params struct (kc_cpu::SoftTargetChunk) is a Python class with
// named fields; buffer fields are host addresses as integers (tensor.data_ptr(), 0 = absent). The Python side
// (kc_kernels/cpu/epilogue.py) checks device, dtype and contiguity of every tensor before taking its address;
// soft_target_chunk checks the fields the kernel cannot run without and raises ValueError before it runs. No torch
// headers are needed here.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "common/pybind_layout.h"
#include "cpu/kc_cpu.h"

namespace py = pybind11;

namespace {

using Params = kc_cpu::SoftTargetChunk;
constexpr const char* kKernel = "soft_target_chunk";

[[noreturn]] void invalid(const std::string& field, const std::string& why) {
  throw py::value_error(std::string(kKernel) + ": " + field + " " + why);
}

void require(const void* address, const char* field, const char* when) {
  if (address == nullptr) invalid(field, std::string("is required ") + when + " (got address 0)");
}

void check_sizes(const Params& p) {
  if (p.rows < 0 || p.ncols < 0 || p.col0 < 0 || p.k < 0) invalid("rows/ncols/col0/k", "must be >= 0");
  if (p.npieces < 1 || p.num_segments < 1) invalid("npieces/num_segments", "must be >= 1");
  if (p.state_stride < 0 || p.state_row_stride < 0 || p.state_segment_stride < 0)
    invalid("state_stride/state_row_stride/state_segment_stride", "must be >= 0");
  if (p.phases <= 0 || p.phases >= (1 << kc::kNumPhases)) invalid("phases", "is not a bitmask of PHASES");
  if (p.scale_kind < 0 || p.scale_kind >= kc::kNumScaleKinds) invalid("scale_kind", "is not a SCALE_KINDS value");
  if (p.mode < 0 || p.mode >= kc::kNumLossModes) invalid("mode", "is not a LOSS_MODES value");
  if (p.scores_dtype < 0 || p.scores_dtype >= kc_cpu::kNumScoresDtypes)
    invalid("scores_dtype", "is not a SCORES_DTYPES value");
}

void check_buffers(const Params& p) {
  require(p.piece_lo, "piece_lo", "always");
  require(p.piece_seg, "piece_seg", "always");
  require(p.state, "state", "always");
  require(p.softplus_sum, "softplus_sum", "always");
  if (p.phases & ~kc::kPhaseTeacher) {
    require(p.u, "u", "by the NORM, STATS and FINAL phases");
    if (p.ld < p.ncols) invalid("ld", "is smaller than ncols");
  }
  if (p.phases & kc::kPhaseTeacher) require(p.teacher, "teacher", "by the TEACHER phase");
  if (p.teacher != nullptr && p.teacher_ld < p.ncols) invalid("teacher_ld", "is smaller than ncols");
  if (p.k > 0) {
    require(p.tidx, "tidx", "when k > 0");
    require(p.tval, "tval", "when k > 0");
  }
  if (p.scale_kind != kc::kScaleNone) require(p.scale, "scale", "when scale_kind is not NONE");
}

bool finite_non_negative(float v) { return v >= 0.f && v < INFINITY; }

// The divergence modes' teacher and beta, and the options of SOFTMAX and KL.
void check_modes(const Params& p) {
  const bool divergence = p.mode == kc::kModeReverseKL || p.mode == kc::kModeJSD;
  if (divergence) {
    const std::string mode = kc::kLossModeNames[p.mode];
    if (p.scale_kind != kc::kScaleNone) invalid("scale_kind", "must be NONE under mode " + mode);
    if (p.phases & ~kc::kPhaseTeacher) require(p.teacher, "teacher", ("by mode " + mode).c_str());
    if (p.k > 0) invalid("k", "must be 0 under mode " + mode + " (sparse targets reach it as a dense teacher)");
  }
  if (p.mode == kc::kModeJSD && !(p.beta > 0.f && p.beta < 1.f))
    invalid("beta", "must be in (0, 1) under mode JSD (got " + std::to_string(p.beta) + ")");
  if (!finite_non_negative(p.softcap) || !finite_non_negative(p.z_loss) || !finite_non_negative(p.uniform_target))
    invalid("softcap/z_loss/uniform_target", "must be finite and >= 0 (0 = off)");
  if (p.softcap != 0.f || p.z_loss != 0.f || p.uniform_target != 0.f) {
    if (p.mode != kc::kModeSoftmax && p.mode != kc::kModeKL)
      invalid("softcap/z_loss/uniform_target", std::string("are options of SOFTMAX and KL, not of mode ") +
                                                   kc::kLossModeNames[p.mode]);
    if (p.scale_kind != kc::kScaleNone) invalid("softcap/z_loss/uniform_target", "take no scale (scale_kind NONE)");
  }
}

// A pointer field as a Python int property.
template <class Ptr>
void def_address(py::class_<Params>& cls, const char* name, Ptr Params::*field) {
  cls.def_property(
      name, [field](const Params& p) { return reinterpret_cast<std::uintptr_t>(p.*field); },
      [field](Params& p, std::uintptr_t address) { p.*field = reinterpret_cast<Ptr>(address); });
}

void def_params(py::module_& m) {
  py::class_<Params> cls(m, "SoftTargetChunkParams",
                         "Arguments of soft_target_chunk; fields as in csrc/cpu/kc_cpu.h (struct SoftTargetChunk).");
  cls.def(py::init<>())
      .def_readwrite("ld", &Params::ld)
      .def_readwrite("rows", &Params::rows)
      .def_readwrite("ncols", &Params::ncols)
      .def_readwrite("col0", &Params::col0)
      .def_readwrite("npieces", &Params::npieces)
      .def_readwrite("num_segments", &Params::num_segments)
      .def_readwrite("phases", &Params::phases)
      .def_readwrite("mode", &Params::mode)
      .def_readwrite("inv_t", &Params::inv_t)
      .def_readwrite("t2", &Params::t2)
      .def_readwrite("scale_kind", &Params::scale_kind)
      .def_readwrite("scores_dtype", &Params::scores_dtype)
      .def_readwrite("k", &Params::k)
      .def_readwrite("state_stride", &Params::state_stride)
      .def_readwrite("state_row_stride", &Params::state_row_stride)
      .def_readwrite("state_segment_stride", &Params::state_segment_stride)
      .def_readwrite("teacher_ld", &Params::teacher_ld)
      .def_readwrite("beta", &Params::beta)
      .def_readwrite("softcap", &Params::softcap)
      .def_readwrite("z_loss", &Params::z_loss)
      .def_readwrite("uniform_target", &Params::uniform_target);
  def_address(cls, "u", &Params::u);
  def_address(cls, "piece_lo", &Params::piece_lo);
  def_address(cls, "piece_seg", &Params::piece_seg);
  def_address(cls, "scale", &Params::scale);
  def_address(cls, "tidx", &Params::tidx);
  def_address(cls, "tval", &Params::tval);
  def_address(cls, "teacher", &Params::teacher);
  def_address(cls, "coef", &Params::coef);
  def_address(cls, "state", &Params::state);
  def_address(cls, "softplus_sum", &Params::softplus_sum);
  def_address(cls, "dscale_class", &Params::dscale_class);
  def_address(cls, "bias", &Params::bias);
  def_address(cls, "dbias", &Params::dbias);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kc CPU kernels (C++17, OpenMP)";
  def_params(m);
  m.def(
      "soft_target_chunk",
      [](Params p) {
        check_sizes(p);
        check_buffers(p);
        check_modes(p);
        if (p.state_stride == 0 && p.state_row_stride == 0 && p.state_segment_stride == 0) {
          p.state_segment_stride = 1;  // the contiguous [kNumStates, rows, num_segments] layout
          p.state_row_stride = p.num_segments;
          p.state_stride = p.rows * p.num_segments;
        }
        py::gil_scoped_release nogil;
        kc_cpu::soft_target_chunk(p);
      },
      py::arg("params"),
      "Fused soft-target epilogue over one chunk of logits (see csrc/cpu/soft_target_impl.h), SoftTargetChunkParams "
      "given; raises ValueError naming a required field that is missing or a size that is out of range.");
  m.def(
      "sampled_rows_exp",
      [](std::uintptr_t u, int64_t ld, int64_t rows, int64_t cols, int64_t pad_cols, std::uintptr_t shift,
         std::uintptr_t extra_max, std::uintptr_t out_max, std::uintptr_t out_sum) {
        if (rows < 0 || cols < 0 || pad_cols < 0 || ld < cols + pad_cols)
          throw py::value_error("sampled_rows_exp: sizes out of range (need 0 <= cols + pad_cols <= ld)");
        if (u == 0 || extra_max == 0 || out_max == 0 || out_sum == 0)
          throw py::value_error("sampled_rows_exp: u, extra_max, out_max and out_sum are required (got address 0)");
        kc_cpu::SampledRowsExp a;
        a.u = reinterpret_cast<float*>(u);
        a.ld = ld, a.rows = rows, a.cols = cols, a.pad_cols = pad_cols;
        a.shift = reinterpret_cast<const float*>(shift);
        a.extra_max = reinterpret_cast<const float*>(extra_max);
        a.out_max = reinterpret_cast<float*>(out_max);
        a.out_sum = reinterpret_cast<float*>(out_sum);
        py::gil_scoped_release nogil;
        kc_cpu::sampled_rows_exp(a);
      },
      py::arg("u"), py::arg("ld"), py::arg("rows"), py::arg("cols"), py::arg("pad_cols"), py::arg("shift"),
      py::arg("extra_max"), py::arg("out_max"), py::arg("out_sum"),
      "Sampled softmax forward row pass over fp32 logits (csrc/cpu/kc_cpu.h: SampledRowsExp); addresses as ints.");
  m.def(
      "sampled_rows_scale",
      [](std::uintptr_t u, int64_t ld, int64_t rows, int64_t cols, std::uintptr_t row_scale, std::uintptr_t colsum) {
        if (rows < 0 || cols < 0 || ld < cols)
          throw py::value_error("sampled_rows_scale: sizes out of range (need 0 <= cols <= ld)");
        if (u == 0 || row_scale == 0)
          throw py::value_error("sampled_rows_scale: u and row_scale are required (got address 0)");
        kc_cpu::SampledRowsScale a;
        a.u = reinterpret_cast<float*>(u);
        a.ld = ld, a.rows = rows, a.cols = cols;
        a.row_scale = reinterpret_cast<const float*>(row_scale);
        a.colsum = reinterpret_cast<float*>(colsum);
        py::gil_scoped_release nogil;
        kc_cpu::sampled_rows_scale(a);
      },
      py::arg("u"), py::arg("ld"), py::arg("rows"), py::arg("cols"), py::arg("row_scale"), py::arg("colsum"),
      "Sampled softmax backward row pass (csrc/cpu/kc_cpu.h: SampledRowsScale); colsum 0 = no column sums.");
  kc::export_soft_target_layout(m);
  {
    using namespace kc_cpu;
    KC_EXPORT_ENUM(m, "SCORES_DTYPES", KC_SCORES_DTYPES);
  }
  m.def("native_bf16", &kc_cpu::native_bf16,
        "Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), so that bf16 GEMMs beat fp32 ones.");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
