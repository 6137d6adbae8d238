// CPU kernels of kc. Plain C++17 + OpenMP over raw float buffers: no torch headers, so the build is independent
// of the torch version. Every buffer is row-major and contiguous unless a leading dimension is given.
#pragma once
#include <cstdint>

namespace kc_cpu {

// out[r] = sum_c softplus(x[r, c]), computed stably as max(v, 0) + log1p(exp(-|v|)).
void row_softplus_sum(const float* x, float* out, int64_t rows, int64_t cols);

// out[r] = logsumexp_c x[r, c]; -inf for a row that is all -inf.
void row_logsumexp(const float* x, float* out, int64_t rows, int64_t cols);

// ---- fused epilogue of the chunked linear + soft-target loss (soft_target.cpp)

enum ScaleKind { kScaleNone = 0, kScaleSegment = 1, kScaleClass = 2 };
enum Phase { kPhaseTeacher = 1, kPhaseNorm = 2, kPhaseStats = 4, kPhaseFinal = 8 };
// Rows of the [kNumStates, B, G] double state array.
enum State {
  kSumSq = 0,       // sum of u^2 over the segment (self-paced norm)
  kMax,             // softmax: running max of y        | sigmoid: unused
  kSumExp,          // softmax: sum exp(y - max)        | sigmoid: unused
  kSumExpU,         // softmax: sum exp(y - max) u/(nT) | sigmoid: sum sigmoid(y) u/(nT)
  kSumExpY,         // softmax: sum exp(y - max) s u/(nT) | sigmoid: sum sigmoid(y) s u/(nT)
  kZSum,            // target mass m = sum z
  kZY,              // sum z y
  kZU,              // sum z u/(nT)
  kZYScaled,        // sum z s u/(nT): the scaled part of y, without the bias (feeds S)
  kTeacherMax,      // dense softmax targets: running max of t/T
  kTeacherSumExp,   // and sum exp(t/T - max)
  kR,               // sum q u/(nT): a per-segment scale's gradient per row
  kS,               // sum q s u/(nT): the norm's gradient term per row
  kNumStates
};

struct SoftTargetChunk {
  float* u;                  // [rows, ncols] logits (row stride ld); overwritten with coef * dL/du in FINAL
  int64_t ld;
  int64_t rows, ncols, col0;  // the chunk holds classes [col0, col0 + ncols)
  int64_t npieces;           // pieces of segments inside the chunk
  const int64_t* piece_lo;   // [npieces + 1] local column bounds
  const int64_t* piece_seg;  // [npieces] segment of each piece
  int64_t num_segments;
  int phases;                // bitmask of Phase, run in order per row and piece
  int softmax;               // 0: sigmoid mode, 1: softmax mode
  float inv_t, t2;           // 1 / T and T^2
  const float* scale;        // self-paced scale, fp32, [G] or [V] (null when scale_kind == kScaleNone)
  int scale_kind;
  const int64_t* tidx;       // sparse targets [rows, k] (global class ids, -1 = padding), or null
  const float* tval;
  int64_t k;
  const float* teacher;      // dense teacher logits of the chunk [rows, ncols] (row stride teacher_ld), or null
  int64_t teacher_ld;
  const float* coef;         // [rows] gradient coefficient (sample weight x reduction x grad output); null: loss only
  double* state;             // [kNumStates, rows, num_segments]
  double* softplus_sum;      // [rows] sigmoid mode: accumulated sum of softplus(y)
  float* dscale_class;       // [ncols] per-class scale gradient of this chunk (accumulated), or null
  const float* bias;         // [V] fp32 class bias, added after the scale: y = s u / (n T) + b / T (null: none)
  float* dbias;              // [ncols] bias gradient of this chunk (accumulated in FINAL), or null
};

void soft_target_chunk(const SoftTargetChunk& args);

}  // namespace kc_cpu
