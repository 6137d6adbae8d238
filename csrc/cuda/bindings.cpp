// pybind11 bindings of the CUDA launchers. Compiled by the host compiler; only kc_cuda.h is seen here, so neither
// CUDA nor torch headers are needed. Each kernel's params struct is a Python class whose buffer fields are device
// addresses as integers (tensor.data_ptr(), 0 = absent) and whose stream is torch's cuda_stream integer. The
// launch functions check the fields a kernel cannot run without and raise ValueError before anything is launched.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/pybind_layout.h"
#include "cuda/kc_cuda.h"

namespace py = pybind11;

namespace {

void check_launch(int code, const char* kernel) {
  if (code != 0) throw std::runtime_error(std::string(kernel) + ": " + kc_cuda::error_string(code));
}

// A pointer field as a Python int property.
template <class P, class Owner, class Ptr>
void def_address(py::class_<P>& cls, const char* name, Ptr Owner::*field) {
  cls.def_property(
      name, [field](const P& p) { return reinterpret_cast<std::uintptr_t>(p.*field); },
      [field](P& p, std::uintptr_t address) { p.*field = reinterpret_cast<Ptr>(address); });
}

void require_address(const void* address, const char* kernel, const char* field) {
  if (address == nullptr) throw py::value_error(std::string(kernel) + ": " + field + " is required (got address 0)");
}

void require_dtype(int dtype, bool float64_allowed, const char* kernel, const char* field) {
  const bool known = dtype >= 0 && dtype < kc_cuda::kNumDTypes;
  if (!known || (dtype == kc_cuda::kFloat64 && !float64_allowed)) {
    throw py::value_error(std::string(kernel) + ": " + field + " " + std::to_string(dtype) +
                          (known ? " (float64) is not a work dtype: float32, float16 or bfloat16"
                                 : " is not a DTYPES value"));
  }
}

void require_non_negative(int64_t value, const char* kernel, const char* field) {
  if (value < 0) throw py::value_error(std::string(kernel) + ": " + field + " is negative");
}

template <class P>
void def_soft_target_inputs(py::class_<P>& cls) {
  using In = kc_cuda::SoftTargetInputs;
  cls.def(py::init<>())
      .def_readwrite("col0", &In::col0)
      .def_readwrite("rows", &In::rows)
      .def_readwrite("ncols", &In::ncols)
      .def_readwrite("num_segments", &In::num_segments)
      .def_readwrite("scores_row_stride", &In::scores_row_stride)
      .def_readwrite("scores_dtype", &In::scores_dtype)
      .def_readwrite("teacher_row_stride", &In::teacher_row_stride)
      .def_readwrite("teacher_dtype", &In::teacher_dtype)
      .def_readwrite("num_targets", &In::num_targets)
      .def_readwrite("targets_row_stride", &In::targets_row_stride)
      .def_readwrite("teacher_col0", &In::teacher_col0)
      .def_readwrite("mode", &In::mode)
      .def_readwrite("inv_t", &In::inv_t)
      .def_readwrite("beta", &In::beta)
      .def_readwrite("softcap", &In::softcap)
      .def_readwrite("uniform_target", &In::uniform_target);
  def_address(cls, "scale", &In::scale);
  def_address(cls, "bias", &In::bias);
  def_address(cls, "teacher", &In::teacher);
  def_address(cls, "target_index", &In::target_index);
  def_address(cls, "target_value", &In::target_value);
}

void check_soft_target_inputs(const kc_cuda::SoftTargetInputs& p, const char* kernel) {
  require_non_negative(p.rows, kernel, "rows");
  require_non_negative(p.ncols, kernel, "ncols");
  require_non_negative(p.num_targets, kernel, "num_targets");
  require_dtype(p.scores_dtype, false, kernel, "scores_dtype");
  if (p.teacher != nullptr) require_dtype(p.teacher_dtype, true, kernel, "teacher_dtype");
  if (p.num_targets > 0) {
    require_address(p.target_index, kernel, "target_index (num_targets > 0)");
    require_address(p.target_value, kernel, "target_value (num_targets > 0)");
  }
  require_non_negative(p.teacher_col0, kernel, "teacher_col0");
  if (p.mode < 0 || p.mode >= kc::kNumLossModes) {
    throw py::value_error(std::string(kernel) + ": mode " + std::to_string(p.mode) + " is not a LOSS_MODES value");
  }
  const bool divergence = p.mode == kc::kModeReverseKL || p.mode == kc::kModeJSD;
  if (p.mode == kc::kModeJSD && !(p.beta > 0.f && p.beta < 1.f)) {
    throw py::value_error(std::string(kernel) + ": beta " + std::to_string(p.beta) + " is outside (0, 1) (JSD)");
  }
  if (!(p.softcap >= 0.f) || std::isinf(p.softcap)) {
    throw py::value_error(std::string(kernel) + ": softcap " + std::to_string(p.softcap) +
                          " must be finite and >= 0 (0: none)");
  }
  if (!std::isfinite(p.uniform_target)) throw py::value_error(std::string(kernel) + ": uniform_target is not finite");
  if ((p.softcap > 0.f || p.uniform_target != 0.f) && p.mode != kc::kModeSoftmax && p.mode != kc::kModeKL) {
    throw py::value_error(std::string(kernel) + ": softcap and uniform_target are options of SOFTMAX and KL, not of " +
                          kc::kLossModeNames[p.mode]);
  }
  if ((p.softcap > 0.f || p.uniform_target != 0.f) && p.scale != nullptr) {
    throw py::value_error(std::string(kernel) + ": softcap and uniform_target take no self-paced scale");
  }
  if (divergence && p.scale != nullptr) {
    throw py::value_error(std::string(kernel) + ": REVERSE_KL and JSD take no self-paced scale");
  }
}

void launch_row_stats(const kc_cuda::RowStatsParams& p) {
  constexpr const char* kernel = "soft_target_row_stats";
  check_soft_target_inputs(p, kernel);
  require_non_negative(p.pieces, kernel, "pieces");
  if (p.phases & (kc::kPhaseNorm | kc::kPhaseStats | kc::kPhaseMix)) {
    require_address(p.scores, kernel, "scores (NORM, STATS or MIX)");
  }
  if ((p.phases & kc::kPhaseMix) && p.mode != kc::kModeJSD) {
    throw py::value_error(std::string(kernel) + ": MIX is a phase of JSD only");
  }
  if (((p.phases & kc::kPhaseStats) && p.mode == kc::kModeReverseKL) || (p.phases & kc::kPhaseMix)) {
    require_address(p.teacher, kernel, "teacher (REVERSE_KL's STATS, JSD's MIX)");
  }
  require_address(p.piece_lo, kernel, "piece_lo");
  require_address(p.piece_seg, kernel, "piece_seg");
  require_address(p.states, kernel, "states");
  check_launch(kc_cuda::soft_target_row_stats(p), kernel);
}

void launch_final(const kc_cuda::FinalParams& p) {
  constexpr const char* kernel = "soft_target_final";
  check_soft_target_inputs(p, kernel);
  require_address(p.scores, kernel, "scores");
  require_address(p.seg_of_class, kernel, "seg_of_class");
  require_address(p.consts, kernel, "consts");
  require_address(p.row_part, kernel, "row_part");
  if (p.coef != nullptr && (p.mode == kc::kModeReverseKL || p.mode == kc::kModeJSD)) {
    require_address(p.teacher, kernel, "teacher (REVERSE_KL and JSD with coef)");
  }
  if (p.coef != nullptr && (p.want_dbias || p.want_dscale)) {
    require_address(p.col_part, kernel, "col_part (coef with want_dbias or want_dscale)");
  }
  check_launch(kc_cuda::soft_target_final(p), kernel);
}

void launch_sampled_softmax(const kc_cuda::SampledSoftmaxParams& p) {
  constexpr const char* kernel = "sampled_softmax";
  require_non_negative(p.rows, kernel, "rows");
  require_non_negative(p.num_true, kernel, "num_true");
  require_non_negative(p.num_sampled, kernel, "num_sampled");
  if (p.num_true > 0) require_address(p.true_logits, kernel, "true_logits (num_true > 0)");
  if (p.num_sampled > 0) require_address(p.sampled_logits, kernel, "sampled_logits (num_sampled > 0)");
  if (p.loss == nullptr && p.coef == nullptr) throw py::value_error("sampled_softmax: neither loss nor coef is set");
  check_launch(kc_cuda::sampled_softmax(p), kernel);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "kc CUDA kernels (nvcc-compiled, raw-pointer launchers)";

  py::class_<kc_cuda::RowStatsParams> row_stats_params(m, "RowStatsParams",
                                                       "Inputs of soft_target_row_stats (csrc/cuda/kc_cuda.h)");
  def_soft_target_inputs(row_stats_params);
  row_stats_params.def_readwrite("pieces", &kc_cuda::RowStatsParams::pieces)
      .def_readwrite("state_stride", &kc_cuda::RowStatsParams::state_stride)
      .def_readwrite("state_row_stride", &kc_cuda::RowStatsParams::state_row_stride)
      .def_readwrite("state_segment_stride", &kc_cuda::RowStatsParams::state_segment_stride)
      .def_readwrite("phases", &kc_cuda::RowStatsParams::phases);
  def_address(row_stats_params, "consts", &kc_cuda::RowStatsParams::consts);
  def_address(row_stats_params, "scores", &kc_cuda::RowStatsParams::scores);
  def_address(row_stats_params, "piece_lo", &kc_cuda::RowStatsParams::piece_lo);
  def_address(row_stats_params, "piece_seg", &kc_cuda::RowStatsParams::piece_seg);
  def_address(row_stats_params, "states", &kc_cuda::RowStatsParams::states);
  def_address(row_stats_params, "stream", &kc_cuda::RowStatsParams::stream);

  py::class_<kc_cuda::FinalParams> final_params(m, "FinalParams", "Inputs of soft_target_final (csrc/cuda/kc_cuda.h)");
  def_soft_target_inputs(final_params);
  final_params.def_readwrite("t2", &kc_cuda::FinalParams::t2)
      .def_readwrite("want_dbias", &kc_cuda::FinalParams::want_dbias)
      .def_readwrite("want_dscale", &kc_cuda::FinalParams::want_dscale);
  def_address(final_params, "scores", &kc_cuda::FinalParams::scores);
  def_address(final_params, "seg_of_class", &kc_cuda::FinalParams::seg_of_class);
  def_address(final_params, "consts", &kc_cuda::FinalParams::consts);
  def_address(final_params, "coef", &kc_cuda::FinalParams::coef);
  def_address(final_params, "row_part", &kc_cuda::FinalParams::row_part);
  def_address(final_params, "col_part", &kc_cuda::FinalParams::col_part);
  def_address(final_params, "stream", &kc_cuda::FinalParams::stream);

  m.def("soft_target_row_stats", &launch_row_stats, py::arg("params"),
        "Fold each (row, segment piece) of a chunk into the state array (phases TEACHER | NORM | STATS | MIX)");
  m.def("soft_target_final", &launch_final, py::arg("params"),
        "Loss row sums per column tile; with coef the logit gradient in place and the column sums per row tile");
  py::class_<kc_cuda::SampledSoftmaxParams> sampled_params(m, "SampledSoftmaxParams",
                                                           "Inputs of sampled_softmax (csrc/cuda/kc_cuda.h)");
  sampled_params.def(py::init<>())
      .def_readwrite("rows", &kc_cuda::SampledSoftmaxParams::rows)
      .def_readwrite("num_true", &kc_cuda::SampledSoftmaxParams::num_true)
      .def_readwrite("true_row_stride", &kc_cuda::SampledSoftmaxParams::true_row_stride)
      .def_readwrite("num_sampled", &kc_cuda::SampledSoftmaxParams::num_sampled)
      .def_readwrite("sampled_row_stride", &kc_cuda::SampledSoftmaxParams::sampled_row_stride);
  def_address(sampled_params, "true_logits", &kc_cuda::SampledSoftmaxParams::true_logits);
  def_address(sampled_params, "sampled_logits", &kc_cuda::SampledSoftmaxParams::sampled_logits);
  def_address(sampled_params, "loss", &kc_cuda::SampledSoftmaxParams::loss);
  def_address(sampled_params, "coef", &kc_cuda::SampledSoftmaxParams::coef);
  def_address(sampled_params, "stream", &kc_cuda::SampledSoftmaxParams::stream);
  m.def("sampled_softmax", &launch_sampled_softmax, py::arg("params"),
        "Per-row sampled-softmax loss of the gathered logits; with coef their gradient in place");

  m.attr("TILE") = py::make_tuple(kc_cuda::kFinalBlockRows, kc_cuda::kFinalBlockCols);
  {
    using namespace kc_cuda;
    KC_EXPORT_ENUM(m, "DTYPES", KC_DTYPES);
  }
  kc::export_soft_target_layout(m);

  m.def("device_count", &kc_cuda::device_count,
        "Visible CUDA devices, or a negative cudaError_t when the runtime cannot start");
  m.def("error_string", &kc_cuda::error_string);
}
