// CUDA epilogue of the chunked linear + soft-target loss: the kernels of docs/epilogue.md, "GPU epilogue".
//
// - row_stats: one block per (row, segment piece) reduces the piece's columns and folds them into
//   states[:, row, piece_seg], in up to three kernels over that grid, launched in the phases' order: teacher_kernel
//   (TEACHER: the dense teacher's log-sum-exp and entropy sum), row_stats_kernel (NORM: the squared norm; STATS: the
//   target and softmax / sigmoid sums, which need the norm and the teacher's log-sum-exp; reverse KL's DIV) and
//   mix_kernel (JSD's MIX: the sums over the mixture M = beta z + (1 - beta) p, which need the finished
//   log-sums-exp). A chunk holds a segment at most once, so each block owns its states.
// - final: one block per [kFinalBlockRows, kFinalBlockCols] tile, elementwise given the per-(row, segment) consts:
//   the loss's row sums per column tile, and with coef the logit gradient written over the scores in place plus the
//   bias / per-class scale gradients as column sums per row tile, which the driver adds up.
//
// Each kernel is instantiated per Variant (below): the sigmoid / softmax code, softmax with its options, reverse KL and
// JSD, so that the options and the divergences add no code or registers to the sigmoid / softmax instances
// (tests/test_cuda_build.py reads them from ptxas). The formulas are those of the CPU epilogue (csrc/common/soft_target_math.h) in fp32,
// whatever the dtypes of the scores and of the teacher. Offsets are int64 (rows x stride passes 2^31 at 100K classes). No atomics and
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

// The instance of the kernels a call runs, chosen by the launchers from the mode and the options. kBase is the
// sigmoid / softmax code with the mode read at run time (KL is softmax's walk and gradient: it runs there); the
// others are compiled apart so that the base instances keep their code and registers.
enum class Variant {
  kBase,       // SIGMOID, SOFTMAX, KL
  kOptions,    // SOFTMAX, KL with a softcap or a uniform target
  kReverseKL,  // REVERSE_KL
  kJSD,        // JSD
};

template <Variant V>
__device__ __forceinline__ bool softmax_family(const SoftTargetInputs& p) {
  return V != Variant::kBase || p.mode == kc::kModeSoftmax;
}

// A self-paced scale exists for the base variant only: the options and the divergences take none (the bindings
// refuse one), so their instances carry no scale code.
template <Variant V>
__device__ __forceinline__ bool scaled(const SoftTargetInputs& p) {
  return V == Variant::kBase && p.scale != nullptr;
}

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

template <Variant V>
__device__ __forceinline__ float scale_of(const SoftTargetInputs& p, int64_t cls) {
  return scaled<V>(p) ? static_cast<const float*>(p.scale)[cls] : 1.f;
}
__device__ __forceinline__ float bias_of(const SoftTargetInputs& p, int64_t cls) {
  return p.bias ? static_cast<const float*>(p.bias)[cls] : 0.f;
}

// ---- the options' and the divergences' per-element math: csrc/common/soft_target_math.h (kc::softcap,
// kc::jsd_element, kc::q_reverse_kl, kc::q_jsd), shared with the CPU epilogue

// CudaMath for the new variants: the reciprocal on [1, 2] (the soft cap's) without a division, whose slow path is a
// called subroutine that spills registers in the final kernel: the approximate reciprocal refined by one Newton
// step (within an ulp; no denormal or overflow on [1, 2]).
struct CudaMathNoDivide : CudaMath {
  static __device__ __forceinline__ float inv_1_2(float x) {
    const float r = __fdividef(1.f, x);
    return fmaf(r, fmaf(-x, r, 1.f), r);
  }
};

// The soft cap of the logit: y = c tanh(v / c) / T with v = u + bias, and dy / dy_raw = 1 - tanh^2, the factor of
// the logit and bias gradients. Off (c = 0): y_raw = (u + bias) / T as the other modes compute it, factor 1.
struct SoftCap {
  float c = 0.f, inv_c = 0.f;
  bool on = false;

  __device__ explicit SoftCap(const SoftTargetInputs& p) {
    if (p.softcap > 0.f) {
      on = true;
      c = p.softcap;
      // 1/c without a division, whose slow path is a called subroutine that spills: the approximate reciprocal
      // and one Newton step (within an ulp)
      const float r = __fdividef(1.f, c);
      inv_c = fmaf(r, fmaf(-c, r, 1.f), r);
    }
  }
  struct Capped {
    float y, dy;
  };
  __device__ __forceinline__ Capped operator()(float u, float bias, float y_raw, float inv_t) const {
    if (!on) return {y_raw, 1.f};
    const kc::Softcapped v = kc::softcap<CudaMathNoDivide>(u + bias, c, inv_c);
    return {v.value * inv_t, v.grad};
  }
};

// JSD's constants of one call: beta, log beta, log(1 - beta).
struct MixWeights {
  float beta, log_beta, log_rest;
  __device__ explicit MixWeights(const SoftTargetInputs& p)
      : beta(p.beta), log_beta(logf(p.beta)), log_rest(log1pf(-p.beta)) {}
};

// What a variant's elements need beyond the params, computed once per thread.
template <Variant V>
struct ModeArgs {  // kBase, kReverseKL: nothing
  __device__ explicit ModeArgs(const SoftTargetInputs&) {}
};
template <>
struct ModeArgs<Variant::kOptions> {
  SoftCap cap;
  __device__ explicit ModeArgs(const SoftTargetInputs& p) : cap(p) {}
};
template <>
struct ModeArgs<Variant::kJSD> {
  MixWeights mix;
  __device__ explicit ModeArgs(const SoftTargetInputs& p) : mix(p) {}
};

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

// The state of (row, piece_seg[piece]) and the piece's local columns [lo, hi): the grid of row_stats and mix.
struct PieceOf {
  int64_t row, lo, hi;
  float* state;

  __device__ explicit PieceOf(const RowStatsParams& p) {
    row = blockIdx.x;
    const int piece = blockIdx.y;
    const int32_t* piece_lo = static_cast<const int32_t*>(p.piece_lo);
    lo = piece_lo[piece];
    hi = piece_lo[piece + 1];
    const int64_t seg = static_cast<const int32_t*>(p.piece_seg)[piece];
    state = static_cast<float*>(p.states) + row * p.state_row_stride + seg * p.state_segment_stride;
  }
};

// local column j of the chunk is the teacher's column teacher_col0 + j
template <class TT>
__device__ __forceinline__ const TT* teacher_row(const SoftTargetInputs& p, int64_t row) {
  return p.teacher ? static_cast<const TT*>(p.teacher) + row * p.teacher_row_stride + p.teacher_col0 : nullptr;
}

// TEACHER (a softmax-family mode's dense teacher; a kernel of its own, templated on the teacher's dtype alone):
// TMAX, TSUMEXP and TENT = sum exp(t/T - TMAX) t/T (the teacher's entropy: sum z log z = TENT / TSUMEXP - tlse),
// merged with the same factors. A class the teacher rules out (t = -inf) adds 0 to both sums.
template <class TT>
__global__ void __launch_bounds__(kRowStatsMaxThreads) teacher_kernel(const RowStatsParams p) {
  __shared__ float scratch[32 * 2];
  const PieceOf piece(p);
  const TT* t = teacher_row<TT>(p, piece.row);
  float* state = piece.state;
  // every thread reads the running values before thread 0 writes them (the reductions below hold barriers)
  const float run_max = state[kc::kTeacherMax * p.state_stride];
  float run_sumexp = state[kc::kTeacherSumExp * p.state_stride];
  float run_ent = state[kc::kTeacherEnt * p.state_stride];

  float m = -INFINITY;
  for (int64_t j = piece.lo + threadIdx.x; j < piece.hi; j += blockDim.x) m = fmaxf(m, to_float(t[j]) * p.inv_t);
  m = block_max(m, scratch);
  // a piece the teacher rules out entirely (all -inf) adds nothing; exp(-inf - -inf) would be NaN
  const float shift = m == -INFINITY ? 0.f : m;
  float s[2] = {0.f, 0.f};
  for (int64_t j = piece.lo + threadIdx.x; j < piece.hi; j += blockDim.x) {
    const float tv = to_float(t[j]);
    const float e = kc::teacher_target_softmax<CudaMath>(tv, p.inv_t, shift);
    s[0] += e;
    s[1] += e > 0.f ? e * (tv * p.inv_t) : 0.f;
  }
  block_sum(s, scratch);
  if (threadIdx.x != 0) return;
  const kc::MaxMerge<float> f = kc::merge_max(run_max, m);
  kc::merge_sum(run_sumexp, s[0], f);
  kc::merge_sum(run_ent, s[1], f);
  state[kc::kTeacherMax * p.state_stride] = f.max;
  state[kc::kTeacherSumExp * p.state_stride] = run_sumexp;
  state[kc::kTeacherEnt * p.state_stride] = run_ent;
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
// kOptions: the logits soft-capped and every target raised by the uniform target (also where there is no other).
template <Variant V, class TS, class TT>
__device__ void stats_phase(const RowStatsParams& p, int64_t row, const TS* u, const TT* t, int64_t lo, int64_t hi,
                            float* state, const SharedStates& run, float* scratch) {
  constexpr bool kOpts = V == Variant::kOptions;
  static_assert(V == Variant::kBase || kOpts, "the divergences have their own STATS");
  const float inv_t = p.inv_t;
  const float inv_nt = kc::inv_norm_t<float>(scaled<V>(p), run.sumsq, inv_t);
  const bool dense_softmax = softmax_family<V>(p) && t != nullptr;
  const float tlse = dense_softmax ? kc::log_sum_exp(run.teacher_max, run.teacher_sumexp) : 0.f;
  const SoftCap cap(p);  // kOptions only
  auto logit_at = [&](int64_t j) {
    const int64_t cls = p.col0 + j;
    const float uj = to_float(u[j]), bias = bias_of(p, cls);
    ClassLogit l = class_logit(uj, scale_of<V>(p, cls), bias, inv_nt, inv_t);
    if constexpr (kOpts) l.y = cap(uj, bias, l.y, inv_t).y;
    return l;
  };

  // softmax: the piece's max first, so each exp is taken once, relative to it
  float m = -INFINITY;
  if (softmax_family<V>(p)) {
    for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) m = fmaxf(m, logit_at(j).y);
    m = block_max(m, scratch);
  }
  enum { kE, kEU, kEY, kZ, kZY, kZU, kZYH };
  float acc[kRowStatsSums] = {};
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    const ClassLogit l = logit_at(j);
    const float w = softmax_family<V>(p) ? CudaMath::exp(l.y - m) : kc::sigmoid<CudaMath>(l.y);
    acc[kE] += w;
    acc[kEU] += w * l.up;
    acc[kEY] += w * l.yh;
    if constexpr (kOpts) {
      // the uniform target's part of ZSUM is added once below (n adds of one small value would drift)
      const float zt = t != nullptr ? kc::teacher_target_softmax<CudaMath>(to_float(t[j]), inv_t, tlse) : 0.f;
      const float z = zt + p.uniform_target;
      acc[kZ] += zt;
      acc[kZY] += z * l.y;
      acc[kZU] += z * l.up;
      acc[kZYH] += z * l.yh;
    } else if (t != nullptr) {
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
  if constexpr (kOpts) acc[kZ] += p.uniform_target * static_cast<float>(hi - lo);
  if (kOpts || t != nullptr || sparse) {
    st(kc::kZSum) += acc[kZ];
    st(kc::kZY) += acc[kZY];
    st(kc::kZU) += acc[kZU];
    st(kc::kZYScaled) += acc[kZYH];
  }
  if (softmax_family<V>(p)) {
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

// The logit of a divergence mode: (u + bias) / T (no scale, no options: the bindings refuse them).
__device__ __forceinline__ float divergence_logit(const SoftTargetInputs& p, float u, float bias) {
  return kc::logit(u, 1.f, p.inv_t, bias, p.inv_t);
}
template <class TS>
__device__ __forceinline__ float divergence_logit(const SoftTargetInputs& p, const TS* u, int64_t j) {
  return divergence_logit(p, to_float(u[j]), bias_of(p, p.col0 + j));
}

// STATS of the divergences: MAX and SUMEXP as softmax's, and for REVERSE_KL DIV = sum exp(y - MAX) (y - t/T),
// merged like SUMEXP. The teacher is dense.
template <Variant V, class TS, class TT>
__device__ void divergence_stats_phase(const RowStatsParams& p, const TS* u, const TT* t, int64_t lo, int64_t hi,
                                       float* state, float* scratch) {
  constexpr bool kReverse = V == Variant::kReverseKL;
  float m = -INFINITY;
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) m = fmaxf(m, divergence_logit(p, u, j));
  m = block_max(m, scratch);
  float acc[kReverse ? 2 : 1] = {};
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    const float y = divergence_logit(p, u, j);
    const float w = CudaMath::exp(y - m);
    acc[0] += w;
    if constexpr (kReverse) acc[1] += w * (y - to_float(t[j]) * p.inv_t);
  }
  block_sum(acc, scratch);
  if (threadIdx.x != 0) return;
  auto st = [&](kc::State which) -> float& { return state[which * p.state_stride]; };
  const kc::MaxMerge<float> f = kc::merge_max(st(kc::kMax), m);
  kc::merge_sum(st(kc::kSumExp), acc[0], f);
  if constexpr (kReverse) kc::merge_sum(st(kc::kDiv), acc[kReverse ? 1 : 0], f);
  st(kc::kMax) = f.max;
}

// NORM and STATS (TEACHER, which they follow, is teacher_kernel).
template <Variant V, class TS, class TT>
__global__ void __launch_bounds__(kRowStatsMaxThreads) row_stats_kernel(const RowStatsParams p) {
  __shared__ float scratch[32 * kRowStatsSums];
  const PieceOf piece(p);
  const int64_t row = piece.row, lo = piece.lo, hi = piece.hi;
  float* state = piece.state;
  const TS* u = static_cast<const TS*>(p.scores) + row * p.scores_row_stride;
  const TT* t = teacher_row<TT>(p, row);

  if constexpr (V == Variant::kBase || V == Variant::kOptions) {
    // Every thread reads the running values it needs before thread 0 writes any (the reductions below hold
    // barriers), then merges the piece into its own copy: no thread reads a state after another wrote it.
    SharedStates run{-INFINITY, 0.f, 0.f};
    if (softmax_family<V>(p) && t != nullptr) {
      run.teacher_max = state[kc::kTeacherMax * p.state_stride];
      run.teacher_sumexp = state[kc::kTeacherSumExp * p.state_stride];
    }
    run.sumsq = state[kc::kSumSq * p.state_stride];
    if (p.phases & kc::kPhaseNorm) norm_phase(p, u, lo, hi, state, run, scratch);
    if (p.phases & kc::kPhaseStats) stats_phase<V>(p, row, u, t, lo, hi, state, run, scratch);
  } else {
    if (p.phases & kc::kPhaseStats) divergence_stats_phase<V>(p, u, t, lo, hi, state, scratch);
  }
}

// ------------------------------------------------------------------------------------------------ mix (JSD)

// Per (row, piece): DLOSS += sum_j beta z (lz - lm) + (1 - beta) p (lp - lm) and DIV += sum_j p (lp - lm), with
// lp = y - lse, lz = t/T - tlse, lm = log(beta z + (1 - beta) p). Plain sums: no max to merge.
template <class TS, class TT>
__global__ void __launch_bounds__(kRowStatsMaxThreads) mix_kernel(const RowStatsParams p) {
  __shared__ float scratch[32 * 2];
  const PieceOf piece(p);
  const int64_t row = piece.row;
  float* state = piece.state;
  const TS* u = static_cast<const TS*>(p.scores) + row * p.scores_row_stride;
  const TT* t = teacher_row<TT>(p, row);

  float lse, tlse;
  if (p.consts != nullptr) {
    const int64_t seg = static_cast<const int32_t*>(p.piece_seg)[blockIdx.y];
    const float* c = static_cast<const float*>(p.consts) + row * p.num_segments + seg;
    const int64_t plane = p.rows * p.num_segments;
    lse = c[kc::kConstLse * plane];
    tlse = c[kc::kConstTeacherLse * plane];
  } else {
    lse = kc::log_sum_exp(state[kc::kMax * p.state_stride], state[kc::kSumExp * p.state_stride]);
    tlse = kc::log_sum_exp(state[kc::kTeacherMax * p.state_stride], state[kc::kTeacherSumExp * p.state_stride]);
  }
  const MixWeights mw(p);
  float acc[2] = {0.f, 0.f};  // DLOSS, DIV
  for (int64_t j = piece.lo + threadIdx.x; j < piece.hi; j += blockDim.x) {
    const float lp = divergence_logit(p, u, j) - lse;
    const float lz = to_float(t[j]) * p.inv_t - tlse;
    const kc::JsdElement el = kc::jsd_element<CudaMath>(lz, lp, mw.beta, mw.log_beta, mw.log_rest);
    acc[0] += el.loss;
    acc[1] += el.div;
  }
  block_sum(acc, scratch);
  if (threadIdx.x != 0) return;
  state[kc::kDivLoss * p.state_stride] += acc[0];
  state[kc::kDiv * p.state_stride] += acc[1];
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

// One element of a divergence (REVERSE_KL, JSD): q = dL/dy from the consts (LSE, TLSE, DBAR) and the teacher;
// with coef the gradient over the score and the bias column sum. The loss comes from
// the states (DIV, DLOSS), so nothing is added to the row sums.
template <Variant V, class TS, class TT>
__device__ __forceinline__ void divergence_element(const FinalParams& p, const ModeArgs<V>& args, int64_t row,
                                                   int64_t j, int k, float b, int32_t seg, float c,
                                                   FinalSums& sums) {
  if (p.coef == nullptr) return;
  const SegmentConsts consts{static_cast<const float*>(p.consts) + row * p.num_segments + seg,
                             p.rows * p.num_segments};
  TS* score = static_cast<TS*>(p.scores) + row * p.scores_row_stride + j;
  const float y = divergence_logit(p, to_float(*score), b);
  const float tt = to_float(static_cast<const TT*>(p.teacher)[row * p.teacher_row_stride + p.teacher_col0 + j]) *
                   p.inv_t;
  const float lp = y - consts[kc::kConstLse];
  float q;
  if constexpr (V == Variant::kReverseKL) {
    // T^2 p ((y - t/T) - DIV / SUMEXP)
    q = kc::q_reverse_kl(CudaMath::exp(lp), y - tt, consts[kc::kConstDbar], p.t2);
  } else {
    // T^2 (1 - beta) p ((lp - lm) - DIV)
    const MixWeights& mw = args.mix;
    const kc::JsdElement el =
        kc::jsd_element<CudaMath>(tt - consts[kc::kConstTeacherLse], lp, mw.beta, mw.log_beta, mw.log_rest);
    q = kc::q_jsd(el.p, el.dlp, consts[kc::kConstDbar], p.t2 * (1.f - mw.beta));
  }
  *score = from_float<TS>(kc::logit_grad_unscaled(c, q, p.inv_t));
  sums.dbias[k] += kc::bias_grad(c, q, p.inv_t);
}

// One element: loss terms into `sums`, and with coef the gradient written over the score.
template <Variant V, class TS, class TT>
__device__ __forceinline__ void final_element(const FinalParams& p, const ModeArgs<V>& args, int64_t row, int64_t j,
                                              int k, float s, float b, int32_t seg, float c, TargetRange range,
                                              FinalSums& sums) {
  if constexpr (V == Variant::kReverseKL || V == Variant::kJSD) {
    divergence_element<V, TS, TT>(p, args, row, j, k, b, seg, c, sums);
  } else {
    constexpr bool kOpts = V == Variant::kOptions;
    const SegmentConsts consts{static_cast<const float*>(p.consts) + row * p.num_segments + seg,
                               p.rows * p.num_segments};
    const float inv_nt = consts[kc::kConstInvNT];
    TS* score = static_cast<TS*>(p.scores) + row * p.scores_row_stride + j;
    const float u = to_float(*score);
    ClassLogit l = class_logit(u, s, b, inv_nt, p.inv_t);
    float dy = 1.f;  // the soft cap's factor
    if constexpr (kOpts) {
      const SoftCap::Capped capped = args.cap(u, b, l.y, p.inv_t);
      l.y = capped.y;
      dy = capped.dy;
    }

    float z = 0.f;
    if (p.teacher != nullptr) {
      const float t = to_float(static_cast<const TT*>(p.teacher)[row * p.teacher_row_stride + p.teacher_col0 + j]);
      z = softmax_family<V>(p) ? kc::teacher_target_softmax<CudaMath>(t, p.inv_t, consts[kc::kConstTeacherLse])
                               : kc::teacher_target_sigmoid<CudaMath>(t, p.inv_t);
    } else if (p.num_targets > 0) {
      z = sparse_target(static_cast<const int32_t*>(p.target_index) + row * p.targets_row_stride,
                        static_cast<const float*>(p.target_value) + row * p.targets_row_stride, range, p.col0 + j);
    }
    if constexpr (kOpts) z += p.uniform_target;
    float q;
    if (softmax_family<V>(p)) {
      q = kc::q_softmax<CudaMath>(l.y, consts[kc::kConstLse], consts[kc::kConstMass], z, p.t2);
    } else {
      const kc::SoftplusSigmoid f = kc::softplus_sigmoid<CudaMath>(l.y);
      sums.softplus += f.softplus;
      q = kc::q_sigmoid(f.sigmoid, z);
    }
    sums.zy += z * l.y;
    if (p.coef == nullptr) return;
    if constexpr (kOpts) q *= dy;  // (no scale here)
    const float grad = scaled<V>(p) ? kc::logit_grad_scaled(c, s, inv_nt, q, u, consts[kc::kConstSN2])
                               : kc::logit_grad_unscaled(c, q, p.inv_t);
    *score = from_float<TS>(grad);
    sums.dbias[k] += kc::bias_grad(c, q, p.inv_t);
    if constexpr (!kOpts) sums.dscale[k] += kc::scale_grad(c, q, l.up);
  }
}

template <Variant V, class TS, class TT>
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
    s[k] = scale_of<V>(p, cls);
    b[k] = bias_of(p, cls);
    seg[k] = static_cast<const int32_t*>(p.seg_of_class)[cls];
  }

  const ModeArgs<V> args(p);
  FinalSums sums;
  for (int r = group; r < rows_here; r += kFinalRowGroups) {
    const int64_t row = row0 + r;
    const float c = p.coef ? static_cast<const float*>(p.coef)[row] : 0.f;
    const TargetRange range = sparse ? ranges[r] : TargetRange{0, 0};
    sums.softplus = sums.zy = 0.f;
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) {
      if (col[k] < p.ncols) final_element<V, TS, TT>(p, args, row, col[k], k, s[k], b[k], seg[k], c, range, sums);
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

template <Variant V>
struct VariantTag {
  static constexpr Variant value = V;
};

// The instance of a call (see Variant), as f(VariantTag<V>{}). KL runs softmax's instances with the mode set to
// SOFTMAX (`base_mode`): the two differ only in the loss, which the driver assembles from the states.
template <class F>
int dispatch_variant(const SoftTargetInputs& p, int& base_mode, F&& f) {
  base_mode = p.mode;
  switch (p.mode) {
    case kc::kModeSigmoid:
      return f(VariantTag<Variant::kBase>{});
    case kc::kModeSoftmax:
    case kc::kModeKL:
      base_mode = kc::kModeSoftmax;
      if (p.softcap > 0.f || p.uniform_target != 0.f) return f(VariantTag<Variant::kOptions>{});
      return f(VariantTag<Variant::kBase>{});
    case kc::kModeReverseKL:
      return f(VariantTag<Variant::kReverseKL>{});
    case kc::kModeJSD:
      return f(VariantTag<Variant::kJSD>{});
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

// f(TypeTag<TS>{}, TypeTag<TT>{}) for the scores' and the teacher's dtypes.
template <class F>
int dispatch_dtypes(const SoftTargetInputs& p, F&& f) {
  const int teacher_dtype = p.teacher ? p.teacher_dtype : kFloat32;  // absent: any instance will do
  return dispatch_work_dtype(p.scores_dtype, [&](auto ts) {
    return dispatch_any_float_dtype(teacher_dtype, [&](auto tt) { return f(ts, tt); });
  });
}

}  // namespace

int soft_target_row_stats(const RowStatsParams& p) {
  if (p.rows == 0 || p.pieces == 0) return 0;
  if (p.rows > kMaxGridX || p.pieces > kMaxGridY) return static_cast<int>(cudaErrorInvalidConfiguration);
  const dim3 grid(static_cast<unsigned>(p.rows), static_cast<unsigned>(p.pieces));
  const int threads = row_stats_threads(p);
  auto stream = static_cast<cudaStream_t>(p.stream);
  RowStatsParams q = p;
  return dispatch_variant(p, q.mode, [&](auto variant) {
    constexpr Variant V = decltype(variant)::value;
    return dispatch_dtypes(q, [&](auto ts, auto tt) {
      using TS = typename decltype(ts)::type;
      using TT = typename decltype(tt)::type;
      // TEACHER first: STATS reads its log-sum-exp
      if ((q.phases & kc::kPhaseTeacher) && q.teacher != nullptr && q.mode != kc::kModeSigmoid) {
        teacher_kernel<TT><<<grid, threads, 0, stream>>>(q);
        const int status = launch_status();
        if (status != 0) return status;
      }
      if (q.phases & (kc::kPhaseNorm | kc::kPhaseStats)) {
        row_stats_kernel<V, TS, TT><<<grid, threads, 0, stream>>>(q);
        const int status = launch_status();
        if (status != 0) return status;
      }
      if constexpr (V == Variant::kJSD) {
        if (q.phases & kc::kPhaseMix) {
          RowStatsParams m = q;
          // statistics of this very call are in the states, not yet in the consts
          if (q.phases & (kc::kPhaseTeacher | kc::kPhaseStats)) m.consts = nullptr;
          mix_kernel<TS, TT><<<grid, threads, 0, stream>>>(m);
          return launch_status();
        }
      }
      return 0;
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
  FinalParams q = p;
  return dispatch_variant(p, q.mode, [&](auto variant) {
    constexpr Variant V = decltype(variant)::value;
    return dispatch_dtypes(q, [&](auto ts, auto tt) {
      using TS = typename decltype(ts)::type;
      using TT = typename decltype(tt)::type;
      final_kernel<V, TS, TT><<<grid, kFinalThreads, 0, stream>>>(q);
      return launch_status();
    });
  });
}

}  // namespace kc_cuda
