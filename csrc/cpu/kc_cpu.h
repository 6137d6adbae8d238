// CPU kernels of kc. Plain C++17 + OpenMP over raw float buffers: no torch headers, so the build is independent
// of the torch version. Every buffer is row-major and contiguous unless a leading dimension is given.
#pragma once
#include <cstdint>

#include "common/soft_target_layout.h"

namespace kc_cpu {

// ---- fused epilogue of the chunked linear + soft-target loss (soft_target.cpp)

// Phases, state rows and scale kinds are shared with the CUDA epilogue and the driver
// (csrc/common/soft_target_layout.h): kPhase*, kSumSq..kS, kNumStates, kScale*.
using namespace kc;

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
