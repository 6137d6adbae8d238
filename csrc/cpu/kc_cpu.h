// CPU kernels of kc. Plain C++17 + OpenMP over raw float buffers: no torch headers, so the build is independent
// of the torch version. Every buffer is row-major and contiguous unless a leading dimension is given.
#pragma once
#include <cstdint>

#include "common/soft_target_layout.h"
#include "common/soft_target_math.h"

namespace kc_cpu {

// ---- fused epilogue of the chunked linear + soft-target loss (soft_target_impl.h)

// Phases, state rows and scale kinds are shared with the CUDA epilogue and the driver
// (csrc/common/soft_target_layout.h): kPhase*, kSumSq..kS, kNumStates, kScale*.
using namespace kc;

// Storage type of the scores buffer u. The epilogue computes in fp32 whatever the storage: bf16 scores (the output of
// a bf16 logits GEMM) are widened row by row into an fp32 row buffer, and the logit gradient is rounded back to bf16
// (to nearest, ties to even) into the same buffer.
#define KC_SCORES_DTYPES(X) X(kScoresF32, "F32") X(kScoresBF16, "BF16")
enum ScoresDtype : int { KC_SCORES_DTYPES(KC_ENUM_ITEM) kNumScoresDtypes };

// Fields default to 0 / null (absent), so the bindings can build one field by field.
struct SoftTargetChunk {
  void* u = nullptr;  // [rows, ncols] scores of type scores_dtype (row stride ld); overwritten with coef * dL/du in FINAL
  int scores_dtype = kScoresF32;  // ScoresDtype of u
  int64_t ld = 0;
  int64_t rows = 0, ncols = 0, col0 = 0;  // the chunk holds classes [col0, col0 + ncols)
  int64_t npieces = 0;  // pieces of segments inside the chunk
  const int64_t* piece_lo = nullptr;  // [npieces + 1] local column bounds
  const int64_t* piece_seg = nullptr;  // [npieces] segment of each piece
  int64_t num_segments = 0;
  int phases = 0;  // bitmask of Phase, run in order per row and piece
  int mode = 0;  // a kc::LossMode (csrc/common/soft_target_math.h)
  float inv_t = 0.f, t2 = 0.f;  // 1 / T and T^2
  const float* scale = nullptr;  // self-paced scale, fp32, [G] or [V] (null when scale_kind == kScaleNone)
  int scale_kind = 0;
  const int64_t* tidx = nullptr;  // sparse targets [rows, k] (global class ids, -1 = padding), or null
  const float* tval = nullptr;
  int64_t k = 0;
  const float* teacher = nullptr;  // dense teacher logits of the chunk [rows, ncols] (row stride teacher_ld), or null
  int64_t teacher_ld = 0;
  const float* coef = nullptr;  // [rows] gradient coefficient (sample weight x reduction x grad output); null: loss only
  double* state = nullptr;  // [kNumStates, rows, num_segments] with the strides below (in elements)
  int64_t state_stride = 0, state_row_stride = 0, state_segment_stride = 0;  // all 0: contiguous
  double* softplus_sum = nullptr;  // [rows] sigmoid mode: accumulated sum of softplus(y)
  float* dscale_class = nullptr;  // [ncols] per-class scale gradient of this chunk (accumulated), or null
  const float* bias = nullptr;  // [V] fp32 class bias, added after the scale: y = s u / (n T) + b / T (null: none)
  float* dbias = nullptr;  // [ncols] bias gradient of this chunk (accumulated in FINAL), or null
  // JSD: M = beta z + (1 - beta) p, beta in (0, 1)
  float beta = 0.f;
  // options of SOFTMAX and KL without a scale (0 = off): y = softcap tanh((u + bias) / softcap) / T; the z-loss
  // z_loss lse^2 per segment (its gradient here, its loss added by the driver); uniform_target added to every
  // class's target (label smoothing's eps / V)
  float softcap = 0.f, z_loss = 0.f, uniform_target = 0.f;
};

void soft_target_chunk(const SoftTargetChunk& args);

// Sampled softmax, forward: per row b, u[b, :cols] (+ shift[:cols] when given) becomes exp(u - m_b), m_b the max of
// the row and of extra_max[b] (the row's true logits); columns [cols, cols + pad_cols) are zeroed.
// out_max[b] = m_b, out_sum[b] = the sum of the row's exps.
struct SampledRowsExp {
  float* u = nullptr;  // [rows, ld] fp32
  int64_t ld = 0, rows = 0, cols = 0, pad_cols = 0;
  const float* shift = nullptr;  // [cols] or null
  const float* extra_max = nullptr;  // [rows]
  float* out_max = nullptr;  // [rows]
  float* out_sum = nullptr;  // [rows]
};
void sampled_rows_exp(const SampledRowsExp& args);

// Sampled softmax, backward: u[b, :cols] *= row_scale[b]; colsum[j] += sum_b u[b, j] (fp64 per thread) when given.
struct SampledRowsScale {
  float* u = nullptr;  // [rows, ld] fp32
  int64_t ld = 0, rows = 0, cols = 0;
  const float* row_scale = nullptr;  // [rows]
  float* colsum = nullptr;  // [cols] or null (accumulated)
};
void sampled_rows_scale(const SampledRowsScale& args);

// Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16): the bf16 GEMMs then run faster than fp32 ones.
bool native_bf16();

}  // namespace kc_cpu
