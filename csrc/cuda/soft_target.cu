// CUDA epilogue of the chunked linear + soft-target loss: the two kernels of docs/epilogue.md, "GPU epilogue".
//
// - row_stats: one block per (row, segment piece) reduces the piece's columns and folds them into
//   states[:, row, piece_seg]: the dense teacher's log-sum-exp (TEACHER), the squared norm (NORM), then the target
//   and softmax / sigmoid sums that need the norm and the teacher's log-sum-exp (STATS). A chunk holds a segment at
//   most once, so each block owns its states.
// - final: one block per [kFinalBlockRows, kFinalBlockCols] tile, elementwise given the per-(row, segment) consts:
//   the loss's row sums per column tile, and with coef the logit gradient written over the scores in place plus the
//   bias / per-class scale gradients as column sums per row tile, which the driver adds up.
//
// The formulas are those of the CPU epilogue (csrc/common/soft_target_math.h) in fp32, whatever the dtypes of the
// scores and of the teacher. Offsets are int64 (rows x stride passes 2^31 at 100K classes). No atomics and
// fixed-order reductions: the same inputs give the same bits.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/soft_target_layout.h"
#include "common/soft_target_math.h"
#include "cuda/device_utils.cuh"
#include "cuda/kc_cuda.h"

namespace kc_cuda {
namespace {

using kc::CudaMath;

constexpr int kRowStatsMaxThreads = 256;
constexpr int kRowStatsSums = 7;  // SUMEXP, SUMEXP_U, SUMEXP_Y, ZSUM, ZY, ZU, ZYH

// The final kernel's threads: kFinalColThreads along a row of the tile, each taking kColsPerThread columns spaced
// kFinalColThreads apart (every load instruction of a warp is one contiguous run), and kFinalRowGroups such rows
// side by side. A row's sums then need one warp reduction per kColsPerThread columns instead of one per column.
constexpr int kFinalThreads = 256;
constexpr int kFinalColThreads = 64;
constexpr int kFinalRowGroups = kFinalThreads / kFinalColThreads;
constexpr int kColsPerThread = kFinalBlockCols / kFinalColThreads;
constexpr int kWarpsPerRow = kFinalColThreads / 32;
static_assert(kFinalBlockCols % kFinalColThreads == 0 && kFinalColThreads % 32 == 0, "tile layout");
static_assert(kFinalBlockRows >= 1 && kFinalThreads % 32 == 0, "tile layout");

// One class of the chunk as the formulas see it: raw score, scale, bias (1 and 0 when absent).
struct ClassLogit {
  float up;  // u/(nT)
  float yh;  // s u/(nT): the scaled part of the logit
  float y;   // yh + bias/T
};

__device__ __forceinline__ ClassLogit class_logit(float u, float s, float bias, float inv_nt, float inv_t) {
  const float up = kc::scaled_score(u, inv_nt);
  return {up, s * up, kc::logit(u, s, inv_nt, bias, inv_t)};
}

__device__ __forceinline__ float scale_of(const SoftTargetInputs& p, int64_t cls) {
  return p.scale ? static_cast<const float*>(p.scale)[cls] : 1.f;
}
__device__ __forceinline__ float bias_of(const SoftTargetInputs& p, int64_t cls) {
  return p.bias ? static_cast<const float*>(p.bias)[cls] : 0.f;
}

// The row's sparse targets with class in [cls_lo, cls_hi): one run of positions of the sorted row.
struct TargetRange {
  int64_t first, end;
};

__device__ __forceinline__ TargetRange targets_between(const SoftTargetInputs& p, int64_t row, int64_t cls_lo,
                                                       int64_t cls_hi) {
  if (p.num_targets == 0) return {0, 0};
  const int32_t* idx = static_cast<const int32_t*>(p.target_index) + row * p.targets_row_stride;
  return {lower_bound(idx, 0, p.num_targets, cls_lo), lower_bound(idx, 0, p.num_targets, cls_hi)};
}

// ------------------------------------------------------------------------------------------------ row_stats

// Running values of one (row, segment) that every thread of the block needs after merging this piece.
struct SharedStates {
  float teacher_max, teacher_sumexp, sumsq;
};

template <class TT>
__device__ void teacher_phase(const RowStatsParams& p, const TT* t, int64_t lo, int64_t hi, float* state,
                              SharedStates& run, float* scratch) {
  float m = -INFINITY;
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) m = fmaxf(m, to_float(t[j]) * p.inv_t);
  m = block_max(m, scratch);
  // a piece the teacher rules out entirely (all -inf) adds nothing; exp(-inf - -inf) would be NaN
  const float shift = m == -INFINITY ? 0.f : m;
  float s[1] = {0.f};
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    s[0] += kc::teacher_target_softmax<CudaMath>(to_float(t[j]), p.inv_t, shift);
  }
  block_sum(s, scratch);
  const kc::MaxMerge<float> f = kc::merge_max(run.teacher_max, m);
  kc::merge_sum(run.teacher_sumexp, s[0], f);
  run.teacher_max = f.max;
  if (threadIdx.x == 0) {
    state[kc::kTeacherMax * p.state_stride] = run.teacher_max;
    state[kc::kTeacherSumExp * p.state_stride] = run.teacher_sumexp;
  }
}

template <class TS>
__device__ void norm_phase(const RowStatsParams& p, const TS* u, int64_t lo, int64_t hi, float* state,
                           SharedStates& run, float* scratch) {
  float s[1] = {0.f};
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    const float v = to_float(u[j]);
    s[0] += v * v;
  }
  block_sum(s, scratch);
  run.sumsq += s[0];
  if (threadIdx.x == 0) state[kc::kSumSq * p.state_stride] = run.sumsq;
}

// STATS: the softmax (max, sum-exp) or sigmoid sums of the piece and its target sums, folded into the states.
template <class TS, class TT>
__device__ void stats_phase(const RowStatsParams& p, int64_t row, const TS* u, const TT* t, int64_t lo, int64_t hi,
                            float* state, const SharedStates& run, float* scratch) {
  const float inv_t = p.inv_t;
  const float inv_nt = kc::inv_norm_t<float>(p.scale != nullptr, run.sumsq, inv_t);
  const bool dense_softmax = (p.mode == kc::kModeSoftmax) && t != nullptr;
  const float tlse = dense_softmax ? kc::log_sum_exp(run.teacher_max, run.teacher_sumexp) : 0.f;
  auto logit_at = [&](int64_t j) {
    const int64_t cls = p.col0 + j;
    return class_logit(to_float(u[j]), scale_of(p, cls), bias_of(p, cls), inv_nt, inv_t);
  };

  // softmax: the piece's max first, so each exp is taken once, relative to it
  float m = -INFINITY;
  if ((p.mode == kc::kModeSoftmax)) {
    for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) m = fmaxf(m, logit_at(j).y);
    m = block_max(m, scratch);
  }
  enum { kE, kEU, kEY, kZ, kZY, kZU, kZYH };
  float acc[kRowStatsSums] = {};
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    const ClassLogit l = logit_at(j);
    const float w = (p.mode == kc::kModeSoftmax) ? CudaMath::exp(l.y - m) : kc::sigmoid<CudaMath>(l.y);
    acc[kE] += w;
    acc[kEU] += w * l.up;
    acc[kEY] += w * l.yh;
    if (t != nullptr) {
      const float tv = to_float(t[j]);
      const float z = (p.mode == kc::kModeSoftmax) ? kc::teacher_target_softmax<CudaMath>(tv, inv_t, tlse)
                                : kc::teacher_target_sigmoid<CudaMath>(tv, inv_t);
      acc[kZ] += z;
      acc[kZY] += z * l.y;
      acc[kZU] += z * l.up;
      acc[kZYH] += z * l.yh;
    }
  }
  const bool sparse = t == nullptr && p.num_targets > 0;
  if (sparse) {
    const TargetRange r = targets_between(p, row, p.col0 + lo, p.col0 + hi);
    const int32_t* idx = static_cast<const int32_t*>(p.target_index) + row * p.targets_row_stride;
    const float* val = static_cast<const float*>(p.target_value) + row * p.targets_row_stride;
    for (int64_t k = r.first + threadIdx.x; k < r.end; k += blockDim.x) {
      const float v = val[k];
      const ClassLogit l = logit_at(idx[k] - p.col0);
      acc[kZ] += v;
      acc[kZY] += v * l.y;
      acc[kZU] += v * l.up;
      acc[kZYH] += v * l.yh;
    }
  }
  block_sum(acc, scratch);
  if (threadIdx.x != 0) return;
  auto st = [&](kc::State which) -> float& { return state[which * p.state_stride]; };
  if (t != nullptr || sparse) {
    st(kc::kZSum) += acc[kZ];
    st(kc::kZY) += acc[kZY];
    st(kc::kZU) += acc[kZU];
    st(kc::kZYScaled) += acc[kZYH];
  }
  if ((p.mode == kc::kModeSoftmax)) {
    const kc::MaxMerge<float> f = kc::merge_max(st(kc::kMax), m);
    kc::merge_sum(st(kc::kSumExp), acc[kE], f);
    kc::merge_sum(st(kc::kSumExpU), acc[kEU], f);
    kc::merge_sum(st(kc::kSumExpY), acc[kEY], f);
    st(kc::kMax) = f.max;
  } else {
    st(kc::kSumExpU) += acc[kEU];
    st(kc::kSumExpY) += acc[kEY];
  }
}

template <class TS, class TT>
__global__ void __launch_bounds__(kRowStatsMaxThreads) row_stats_kernel(const RowStatsParams p) {
  __shared__ float scratch[32 * kRowStatsSums];
  const int64_t row = blockIdx.x;
  const int piece = blockIdx.y;
  const int32_t* piece_lo = static_cast<const int32_t*>(p.piece_lo);
  const int64_t lo = piece_lo[piece], hi = piece_lo[piece + 1];
  const int64_t seg = static_cast<const int32_t*>(p.piece_seg)[piece];
  float* state = static_cast<float*>(p.states) + row * p.state_row_stride + seg * p.state_segment_stride;
  const TS* u = static_cast<const TS*>(p.scores) + row * p.scores_row_stride;
  // local column j of the chunk is global class col0 + j
  const TT* t = p.teacher ? static_cast<const TT*>(p.teacher) + row * p.teacher_row_stride + p.col0 : nullptr;

  const bool dense_softmax = (p.mode == kc::kModeSoftmax) && t != nullptr;
  // Every thread reads the running values it needs before thread 0 writes any (the reductions below hold
  // barriers), then merges the piece into its own copy: no thread reads a state after another wrote it.
  SharedStates run{-INFINITY, 0.f, 0.f};
  if (dense_softmax) {
    run.teacher_max = state[kc::kTeacherMax * p.state_stride];
    run.teacher_sumexp = state[kc::kTeacherSumExp * p.state_stride];
  }
  run.sumsq = state[kc::kSumSq * p.state_stride];

  if ((p.phases & kc::kPhaseTeacher) && dense_softmax) teacher_phase(p, t, lo, hi, state, run, scratch);
  if (p.phases & kc::kPhaseNorm) norm_phase(p, u, lo, hi, state, run, scratch);
  if (p.phases & kc::kPhaseStats) stats_phase(p, row, u, t, lo, hi, state, run, scratch);
}

// ------------------------------------------------------------------------------------------------ final

// The per-(row, segment) constants of one element.
struct SegmentConsts {
  const float* base;  // consts + row * G + segment
  int64_t plane;      // rows * G
  __device__ __forceinline__ float operator[](kc::Const which) const { return base[which * plane]; }
};

// z of (row, class) from the row's sorted sparse targets in [range.first, range.end): duplicates add up.
__device__ __forceinline__ float sparse_target(const int32_t* idx, const float* val, TargetRange range, int64_t cls) {
  if (range.first == range.end) return 0.f;
  float z = 0.f;
  for (int64_t k = lower_bound(idx, range.first, range.end, cls); k < range.end && idx[k] == cls; ++k) z += val[k];
  return z;
}

// Per-thread accumulators of the final kernel.
struct FinalSums {
  float softplus = 0.f, zy = 0.f;  // of the current row
  float dbias[kColsPerThread] = {}, dscale[kColsPerThread] = {};  // of the thread's columns, over its rows
};

// One element: loss terms into `sums`, and with coef the gradient written over the score.
template <class TS, class TT>
__device__ __forceinline__ void final_element(const FinalParams& p, int64_t row, int64_t j, int k, float s, float b,
                                              int32_t seg, float c, TargetRange range, FinalSums& sums) {
  const int64_t cls = p.col0 + j;
  const SegmentConsts consts{static_cast<const float*>(p.consts) + row * p.num_segments + seg,
                             p.rows * p.num_segments};
  const float inv_nt = consts[kc::kConstInvNT];
  TS* score = static_cast<TS*>(p.scores) + row * p.scores_row_stride + j;
  const float u = to_float(*score);
  const ClassLogit l = class_logit(u, s, b, inv_nt, p.inv_t);

  float z = 0.f;
  if (p.teacher != nullptr) {
    const float t = to_float(static_cast<const TT*>(p.teacher)[row * p.teacher_row_stride + cls]);
    z = (p.mode == kc::kModeSoftmax) ? kc::teacher_target_softmax<CudaMath>(t, p.inv_t, consts[kc::kConstTeacherLse])
                  : kc::teacher_target_sigmoid<CudaMath>(t, p.inv_t);
  } else if (p.num_targets > 0) {
    z = sparse_target(static_cast<const int32_t*>(p.target_index) + row * p.targets_row_stride,
                      static_cast<const float*>(p.target_value) + row * p.targets_row_stride, range, cls);
  }
  float q;
  if ((p.mode == kc::kModeSoftmax)) {
    q = kc::q_softmax<CudaMath>(l.y, consts[kc::kConstLse], consts[kc::kConstMass], z, p.t2);
  } else {
    const kc::SoftplusSigmoid f = kc::softplus_sigmoid<CudaMath>(l.y);
    sums.softplus += f.softplus;
    q = kc::q_sigmoid(f.sigmoid, z);
  }
  sums.zy += z * l.y;
  if (p.coef == nullptr) return;
  const float grad = p.scale ? kc::logit_grad_scaled(c, s, inv_nt, q, u, consts[kc::kConstSN2])
                             : kc::logit_grad_unscaled(c, q, p.inv_t);
  *score = from_float<TS>(grad);
  sums.dbias[k] += kc::bias_grad(c, q, p.inv_t);
  sums.dscale[k] += kc::scale_grad(c, q, l.up);
}

template <class TS, class TT>
__global__ void __launch_bounds__(kFinalThreads) final_kernel(const FinalParams p) {
  __shared__ float row_sums[kFinalBlockRows][2][kWarpsPerRow];  // softplus, z y per warp of a row
  __shared__ float col_sums[kFinalRowGroups][2][kFinalBlockCols];  // dbias, dscale per row group
  __shared__ TargetRange ranges[kFinalBlockRows];

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kFinalBlockRows;
  const int64_t col_first = static_cast<int64_t>(blockIdx.y) * kFinalBlockCols;
  const int rows_here = static_cast<int>(smaller(kFinalBlockRows, p.rows - row0));
  const int col_thread = threadIdx.x % kFinalColThreads, group = threadIdx.x / kFinalColThreads;
  const bool sparse = p.teacher == nullptr && p.num_targets > 0;

  if (sparse && threadIdx.x < rows_here) {
    const int64_t col_end = smaller(col_first + kFinalBlockCols, p.ncols);
    ranges[threadIdx.x] = targets_between(p, row0 + threadIdx.x, p.col0 + col_first, p.col0 + col_end);
  }
  __syncthreads();

  // what each of the thread's columns needs, loaded once for all rows of the tile
  int64_t col[kColsPerThread];
  float s[kColsPerThread], b[kColsPerThread];
  int32_t seg[kColsPerThread];
#pragma unroll
  for (int k = 0; k < kColsPerThread; ++k) {
    col[k] = col_first + col_thread + k * kFinalColThreads;
    const bool inside = col[k] < p.ncols;
    const int64_t cls = p.col0 + (inside ? col[k] : 0);
    s[k] = scale_of(p, cls);
    b[k] = bias_of(p, cls);
    seg[k] = static_cast<const int32_t*>(p.seg_of_class)[cls];
  }

  FinalSums sums;
  for (int r = group; r < rows_here; r += kFinalRowGroups) {
    const int64_t row = row0 + r;
    const float c = p.coef ? static_cast<const float*>(p.coef)[row] : 0.f;
    const TargetRange range = sparse ? ranges[r] : TargetRange{0, 0};
    sums.softplus = sums.zy = 0.f;
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) {
      if (col[k] < p.ncols) final_element<TS, TT>(p, row, col[k], k, s[k], b[k], seg[k], c, range, sums);
    }
    float v[2] = {sums.softplus, sums.zy};
    warp_sum(v);
    if ((threadIdx.x & 31) == 0) {
      row_sums[r][0][col_thread / 32] = v[0];
      row_sums[r][1][col_thread / 32] = v[1];
    }
  }
  const bool col_out = p.coef != nullptr && p.col_part != nullptr && (p.want_dbias || p.want_dscale);
  if (col_out) {
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) {
      col_sums[group][0][col_thread + k * kFinalColThreads] = sums.dbias[k];
      col_sums[group][1][col_thread + k * kFinalColThreads] = sums.dscale[k];
    }
  }
  __syncthreads();

  // row_part[plane, col_tile, row]; the warps of a row are added in order
  float* row_part = static_cast<float*>(p.row_part);
  for (int i = threadIdx.x; i < 2 * rows_here; i += kFinalThreads) {
    const int plane = i / rows_here, r = i % rows_here;
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarpsPerRow; ++w) total += row_sums[r][plane][w];
    row_part[(plane * static_cast<int64_t>(gridDim.y) + blockIdx.y) * p.rows + row0 + r] = total;
  }
  if (!col_out) return;
  // col_part[plane, row_tile, col]; the row groups are added in order
  float* col_part = static_cast<float*>(p.col_part);
  for (int i = threadIdx.x; i < kFinalBlockCols; i += kFinalThreads) {
    const int64_t j = col_first + i;
    if (j >= p.ncols) continue;
    float dbias = 0.f, dscale = 0.f;
#pragma unroll
    for (int g = 0; g < kFinalRowGroups; ++g) {
      dbias += col_sums[g][0][i];
      dscale += col_sums[g][1][i];
    }
    if (p.want_dbias) col_part[static_cast<int64_t>(blockIdx.x) * p.ncols + j] = dbias;
    if (p.want_dscale) col_part[(static_cast<int64_t>(gridDim.x) + blockIdx.x) * p.ncols + j] = dscale;
  }
}

constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

// Threads of a row_stats block: about four columns each for the chunk's average piece, 32 to 256.
int row_stats_threads(const RowStatsParams& p) {
  const int64_t per_piece = (p.ncols + p.pieces - 1) / p.pieces;
  int threads = 32;
  while (threads < kRowStatsMaxThreads && 4 * threads < per_piece) threads *= 2;
  return threads;
}

}  // namespace

int soft_target_row_stats(const RowStatsParams& p) {
  if (p.rows == 0 || p.pieces == 0) return 0;
  if (p.rows > kMaxGridX || p.pieces > kMaxGridY) return static_cast<int>(cudaErrorInvalidConfiguration);
  const dim3 grid(static_cast<unsigned>(p.rows), static_cast<unsigned>(p.pieces));
  const int threads = row_stats_threads(p);
  auto stream = static_cast<cudaStream_t>(p.stream);
  const int teacher_dtype = p.teacher ? p.teacher_dtype : kFloat32;  // absent: any instance will do
  return dispatch_work_dtype(p.scores_dtype, [&](auto ts) {
    return dispatch_any_float_dtype(teacher_dtype, [&](auto tt) {
      using TS = typename decltype(ts)::type;
      using TT = typename decltype(tt)::type;
      row_stats_kernel<TS, TT><<<grid, threads, 0, stream>>>(p);
      return launch_status();
    });
  });
}

int soft_target_final(const FinalParams& p) {
  if (p.rows == 0 || p.ncols == 0) return 0;
  const int64_t row_tiles = (p.rows + kFinalBlockRows - 1) / kFinalBlockRows;
  const int64_t col_tiles = (p.ncols + kFinalBlockCols - 1) / kFinalBlockCols;
  if (row_tiles > kMaxGridX || col_tiles > kMaxGridY) return static_cast<int>(cudaErrorInvalidConfiguration);
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
  auto stream = static_cast<cudaStream_t>(p.stream);
  const int teacher_dtype = p.teacher ? p.teacher_dtype : kFloat32;
  return dispatch_work_dtype(p.scores_dtype, [&](auto ts) {
    return dispatch_any_float_dtype(teacher_dtype, [&](auto tt) {
      using TS = typename decltype(ts)::type;
      using TT = typename decltype(tt)::type;
      final_kernel<TS, TT><<<grid, kFinalThreads, 0, stream>>>(p);
      return launch_status();
    });
  });
}

}  // namespace kc_cuda
