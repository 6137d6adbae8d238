// Launchers of kc's CUDA kernels. This header is included by the host-compiled pybind11 bindings, so it uses no
// CUDA or torch types: buffers are raw device addresses, the stream is a cudaStream_t passed as void*, and every
// launcher returns a cudaError_t as int (0 = success) that the bindings turn into a Python exception. Each kernel
// takes one params struct with named fields; a null pointer means the input is absent.
#pragma once
#include <cstdint>

#include "common/soft_target_layout.h"  // KC_ENUM_ITEM

namespace kc_cuda {

// Element type of a buffer whose type varies with the inputs (scores, teacher logits).
#define KC_DTYPES(X) X(kFloat32, "float32") X(kFloat16, "float16") X(kBFloat16, "bfloat16") X(kFloat64, "float64")
enum DType { KC_DTYPES(KC_ENUM_ITEM) kNumDTypes };

// ---- soft-target epilogue (soft_target.cu; contract: docs/epilogue.md, "GPU epilogue")

// Tile of the final kernel, (BLOCK_R, BLOCK_C): the driver sizes its partial-sum buffers with it.
constexpr int kFinalBlockRows = 32;
constexpr int kFinalBlockCols = 256;

// Inputs every epilogue kernel reads. Per-row buffers start at the chunk's first row; class-indexed ones (scale,
// bias, target indices) use global class ids; the chunk holds classes [col0, col0 + ncols). The teacher's column
// teacher_col0 + j holds the chunk's local column j (class col0 + j): teacher_col0 = col0 for the full dense
// teacher, 0 for a teacher made per chunk (a teacher head's, or a filled top-K teacher's).
struct SoftTargetInputs {
  int64_t col0 = 0, rows = 0, ncols = 0;
  int64_t num_segments = 0;        // G
  int64_t scores_row_stride = 0;   // elements; columns are contiguous
  int scores_dtype = kFloat32;     // kFloat32, kFloat16 or kBFloat16
  const void* scale = nullptr;     // fp32 [V] self-paced scale per class (a segment's scale expanded), or null
  const void* bias = nullptr;      // fp32 [V] class bias, or null
  const void* teacher = nullptr;   // [rows, >= teacher_col0 + ncols] dense teacher logits (columns contiguous)
  int64_t teacher_row_stride = 0;
  int64_t teacher_col0 = 0;        // the teacher's column of class col0
  int teacher_dtype = kFloat32;    // any DType
  const void* target_index = nullptr;  // int32 [rows, K] sparse targets, sorted per row; V marks padding
  const void* target_value = nullptr;  // fp32 [rows, K]
  int64_t num_targets = 0;             // K (0: no sparse targets)
  int64_t targets_row_stride = 0;      // of both target_index and target_value
  int mode = 0;                        // a kc::LossMode (csrc/common/soft_target_math.h)
  float inv_t = 1.f;                   // 1 / T
  float beta = 0.5f;                   // JSD: M = beta z + (1 - beta) p, in (0, 1)
  float softcap = 0.f;                 // SOFTMAX, KL without a scale: c > 0: y = c tanh((u + bias) / c) / T; 0: off
  float uniform_target = 0.f;          // SOFTMAX, KL without a scale: added to every class's target
};

// row_stats: one block per (row, piece) folds the piece's columns into states[:, row, piece_seg[piece]]. With MIX
// in phases (JSD) a second kernel over the same grid adds the mixture's sums once TEACHER and STATS are complete;
// it reads the log-sums-exp from consts (LSE, TLSE) when given and the call runs neither TEACHER nor STATS, else
// from the states.
struct RowStatsParams : SoftTargetInputs {
  const void* scores = nullptr;     // [rows, ncols] u = x W_c^T (no bias), read only
  int64_t pieces = 0;
  const void* piece_lo = nullptr;   // int32 [pieces + 1] local column bounds of the segment pieces
  const void* piece_seg = nullptr;  // int32 [pieces] segment of each piece
  void* states = nullptr;           // fp32 [NUM_STATES, rows, G] view
  int64_t state_stride = 0, state_row_stride = 0, state_segment_stride = 0;
  int phases = 0;                   // bitmask of kc::Phase among TEACHER | NORM | STATS | MIX
  const void* consts = nullptr;     // fp32 [NUM_CONSTS, rows, G] contiguous (MIX), or null: from the states
  void* stream = nullptr;
};

// final: one block per [kFinalBlockRows, kFinalBlockCols] tile, elementwise given the per-(row, segment) consts.
struct FinalParams : SoftTargetInputs {
  void* scores = nullptr;             // [rows, ncols] u; with coef overwritten by coef_b * dL/du (same dtype)
  const void* seg_of_class = nullptr;  // int32 [V]
  const void* consts = nullptr;       // fp32 [NUM_CONSTS, rows, G] contiguous
  const void* coef = nullptr;         // fp32 [rows] gradient coefficient, or null: loss sums only, scores untouched
  float t2 = 1.f;                     // T^2
  void* row_part = nullptr;           // fp32 [2, n_col_tiles, rows]: row sums of softplus(y) and of z y per tile
  void* col_part = nullptr;           // fp32 [2, n_row_tiles, ncols]: column sums of coef q/T and coef q u/(nT)
  bool want_dbias = false, want_dscale = false;  // which col_part planes to write (with coef only)
  void* stream = nullptr;
};

int soft_target_row_stats(const RowStatsParams& p);
int soft_target_final(const FinalParams& p);

// ---- sampled softmax (sampled_softmax.cu)

// Per row b of the gathered logits: the true labels' logits [B, T] and the sampled classes' logits [B, S] (fp32,
// -inf where masked: padding labels, accidental hits). Computes loss[b] = logsumexp over both - sum_t target_t
// true_t, the target being 1/num_true on each unmasked true logit; with coef, overwrites both buffers in place by
// coef[b] (softmax - target), the gradient of coef[b] loss[b] with respect to the logits (0 where masked).
struct SampledSoftmaxParams {
  int64_t rows = 0;
  void* true_logits = nullptr;  // fp32 [rows, num_true] (columns contiguous)
  int64_t num_true = 0;
  int64_t true_row_stride = 0;
  void* sampled_logits = nullptr;  // fp32 [rows, num_sampled] (columns contiguous)
  int64_t num_sampled = 0;
  int64_t sampled_row_stride = 0;
  void* loss = nullptr;        // fp32 [rows], or null
  const void* coef = nullptr;  // fp32 [rows], or null: the logits are left as they are
  void* stream = nullptr;
};

int sampled_softmax(const SampledSoftmaxParams& p);

// ---- runtime (runtime.cu)

// Name of a cudaError_t value.
const char* error_string(int code);

// Number of visible CUDA devices, or a negative cudaError_t when the runtime cannot be initialised.
int device_count();

}  // namespace kc_cuda
