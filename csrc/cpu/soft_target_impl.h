// Fused epilogue of the chunked linear + soft-target loss (see kc_kernels/driver.py for the driver).
// The implementation, included by soft_target.cpp (fp32 scores) and soft_target_bf16.cpp (bf16 scores): one
// translation unit per scores type, so that the fp32 instances are compiled (inlined, vectorised) exactly as when
// they were the only ones, and give the same bits.
//
// The driver computes one chunk of raw scores u = x W_c^T with a BLAS GEMM; this kernel then makes one pass over it
// per row (OpenMP over rows, vectorised inner loops) that accumulates the loss statistics and, in the FINAL phase,
// overwrites u with coef_b * dL/du so the driver's gradient GEMMs (dx += G W_c, dW_c = G^T x) follow.
//
// Notation per row b and segment g: y_j = a_j u_j + b_j / T, with a_j = s_j / (n T) under the self-paced scale s
// (n = sqrt(sum_{i in g} u_i^2 + eps)) and a_j = 1 / T without it; the bias is a class prior outside the
// normalisation. yh_j = a_j u_j is the scaled part of y. q_j = dl/dy_j:
//   sigmoid: q_j = sigmoid(y_j) - z_j
//   softmax: q_j = T^2 (m_g softmax_g(y)_j - z_j),  m_g = sum_{j in g} z_j
//   dl/du_i = a_i q_i - (u_i / n^2) S,  S = sum_{j in g} q_j yh_j   (the second term only under the scale)
//   dl/db_j = q_j / T
//   dl/ds_j = q_j u_j / (n T)  (summed over a segment for a per-segment scale: R = sum_j q_j u_j / (n T))
// Statistics over a whole segment (n, the softmax log-sum-exp, S, R) live in a [NSTATE, B, G] double array, so a
// segment longer than a chunk is handled by running the phases over its sub-chunks one after another.
// The formulas themselves are the ones the CUDA epilogue uses (csrc/common/soft_target_math.h), evaluated with the
// vectorisable exp/log1p of vecmath.h.
// The scores are fp32 or bf16 (the output of a bf16 logits GEMM, scores_dtype): the math is fp32 either way (see run).
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/soft_target_math.h"
#include "cpu/kc_cpu.h"
#include "cpu/vecmath.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace kc_cpu {
namespace {

struct Target {
  int64_t col;  // local column in the chunk
  int64_t piece;
  float value;
};

template <int SK>
inline float scale_at(const SoftTargetChunk& a, int64_t g, int64_t j) {
  if constexpr (SK == kScaleSegment) return a.scale[g];
  if constexpr (SK == kScaleClass) return a.scale[a.col0 + j];
  return 1.0f;
}

// The loops below specialise on whether a mode keeps statistics over a segment (the softmax's log-sum-exp, and the
// exp-sharing fast paths that go with it); a mode's own per-element terms come from LossTerms<MODE>
// (csrc/common/soft_target_math.h).
template <LossMode MODE>
constexpr bool kSegmentLse = LossTerms<MODE>::kSegmentLse;

struct FinalSums {
  float sp;  // sigmoid mode: sum softplus(y)
  float zy;  // sigmoid mode: sum z y over dense targets (softmax mode: both unused)
};

// Whether the bias has been added to the scores (see fold_bias): a softmax without a scale.
template <int SK, LossMode MODE>
constexpr bool kBiasFolded = kSegmentLse<MODE> && SK == kScaleNone;

// Whether STATS can leave FINAL what it would recompute (see stats_phase, STORE): a softmax without a scale (its
// exps) or a sigmoid under one (its sigmoids and loss).
template <int SK, LossMode MODE>
constexpr bool kStatsStores = kSegmentLse<MODE> == (SK == kScaleNone);

// The options of a softmax without a scale (SoftTargetChunk::softcap, z_loss, uniform_target), as a template
// argument: the option-free instances keep their code (and bits), and a call with options runs one of these.
enum Opts : int {
  kOptsNone = 0,
  kOptsTargets = 1,  // z-loss and/or a uniform target (each read at run time: 0 adds nothing)
  kOptsCap = 2,      // soft-capping, with whichever of the two above are set
};

// The logit gradient of one class written over its score (and its column-sum terms), shared by both modes' loops.
template <int SK, bool BIAS_GRAD>
KC_VEC_INLINE void write_grad(float* __restrict u, int64_t j, float uj, float s, float up, float q, float inv_nt,
                              float inv_t, float c, float s_n2, double* __restrict ds, float* __restrict db) {
  u[j] = SK != kScaleNone ? logit_grad_scaled(c, s, inv_nt, q, uj, s_n2) : logit_grad_unscaled(c, q, inv_t);
  if constexpr (BIAS_GRAD) db[j] += bias_grad(c, q, inv_t);
  if constexpr (SK == kScaleClass) ds[j] += static_cast<double>(c) * q * up;
}

// sum softplus(y) = sum max(y, 0) + log1p(e), e = exp(-|y|), over a row piece without a log per logit. For
// e < 2^-8, log1p(e) = e - e^2/2 + e^3/3 (relative error below e^3/4 < 1.5e-8). The larger e (|y| < 5.5) use
// sum log1p(e_j) = log prod (1 + e_j), with the 1 + e the sigmoid needs anyway: each of kLanes lanes multiplies its
// factors fl(1 + e) (in [1, 2]) into a running product, whose exponent is moved into an integer every kRenormSteps
// rounds (so it never overflows) and whose mantissa gets one log at the end. The rounding of fl(1 + e) is carried
// exactly: fl(1 + e) - 1 is exact, so d = (fl(1 + e) - 1) - e is that rounding and log1p(e) = log fl(1 + e) -
// d / fl(1 + e) to second order in d (<= 2^-24). Each product rounds by at most 2^-24 relative, i.e. 2^-24 absolute
// on a term of at least log1p(2^-8) = 0.0039, random in sign. (A small e in the product would be lost in its
// rounding, hence the series.)
struct SoftplusLanes {
  static constexpr int kLanes = 16;
  static constexpr int kRenormSteps = 64;  // a lane's product of at most 65 factors in [1, 2] stays below 2^65
  static constexpr float kSmall = 1.0f / 256.0f;
  float lin[kLanes], series[kLanes], dlog[kLanes], prod[kLanes];
  int32_t pexp[kLanes];

  SoftplusLanes() {
    for (int k = 0; k < kLanes; ++k) {
      lin[k] = series[k] = dlog[k] = 0.f;
      prod[k] = 1.f;
      pexp[k] = 0;
    }
  }
  // softplus(y) into lane k; sets e = exp(-|y|) and inv = 1 / (1 + e), which the caller's sigmoid(y) is made of
  KC_VEC_INLINE void add(int k, float y, float& e, float& inv) {
    e = VecMath::exp(-std::fabs(y));
    const float one_e = 1.0f + e;
    inv = VecMath::inv_1_2(one_e);
    lin[k] += y > 0.0f ? y : 0.0f;
    const bool small = e < kSmall;  // false for a NaN y (e is NaN): dlog, and so the sum, is NaN
    series[k] += small ? e * std::fma(e, std::fma(e, 1.0f / 3.0f, -0.5f), 1.0f) : 0.0f;
    prod[k] *= small ? 1.0f : one_e;
    dlog[k] = std::fma(small ? 0.0f : (one_e - 1.0f) - e, inv, dlog[k]);
  }
  // the mantissa of each lane's product back to [1, 2), its exponent counted in pexp
  KC_VEC_INLINE void renormalise() {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) {
      const int32_t bits = __builtin_bit_cast(int32_t, prod[k]);
      pexp[k] += (bits >> 23) - 127;
      prod[k] = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f800000);
    }
  }
  float total() {
    renormalise();
    float sp = 0.f;
    int32_t ex = 0;
#pragma omp simd reduction(+ : sp, ex)
    for (int k = 0; k < kLanes; ++k) {
      sp += lin[k] + series[k] + VecMath::log1p_unit(prod[k] - 1.0f) - dlog[k];
      ex += pexp[k];
    }
    return sp + static_cast<float>(ex) * 0.69314718055994531f;
  }
};

// step(i, k) for i in [0, n), k the lane of i, kLanes at a time (a vector each) and then the tail.
template <class Step>
KC_VEC_INLINE void lane_walk(int64_t n, SoftplusLanes& sl, Step step) {
  constexpr int kLanes = SoftplusLanes::kLanes;
  int64_t i = 0;
  for (int rounds = 0; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) step(i + k, k);
    if (++rounds == SoftplusLanes::kRenormSteps) {
      sl.renormalise();
      rounds = 0;
    }
  }
  for (int k = 0; i + k < n; ++k) step(i + k, k);  // one more factor in some lanes
}

// The FINAL phase over one row piece of n classes: loss sums and, when GRAD, u overwritten by c * dL/du. A leaf
// function over restrict pointers (noinline: inlined into the callers' OpenMP bodies, GCC failed to if-convert the
// sigmoid's lane loop), vectorised for every template instance.
// ``t``: sigmoid mode, the dense teacher's logits; softmax mode, the row's teacher exps (target = t[j] * zscale,
// see teacher_targets). FROM_STATS: the STATS phase of the same call left what FINAL would recompute (see
// stats_phase): softmax, exp(y - m) over the scores, so softmax(y) = u * escale is a multiply instead of an exp;
// sigmoid, sigmoid(y) in ``sg`` and the softplus sum already counted (no exp, no loss sums here).
// OPTS (a softmax without a scale): every target gets + ``uni`` (the uniform target), and under kOptsCap the
// gradient of class j is times capf[j], the soft-cap's derivative (see fold_bias).
template <int SK, LossMode MODE, bool DENSE, bool GRAD, bool BIAS_GRAD, bool FROM_STATS = false, int OPTS = kOptsNone>
__attribute__((noinline)) FinalSums final_loop(float* __restrict u, const float* __restrict t,
                                               const float* __restrict sg, const float* __restrict sc,
                                               const float* __restrict bias, int64_t n, float s_seg, float inv_nt,
                                               float inv_t, float t2, float zscale, float lse, float escale,
                                               float zmass, float c, float s_n2, double* __restrict ds,
                                               float* __restrict db, float uni = 0.f,
                                               const float* __restrict capf = nullptr) {
  static_assert(OPTS == kOptsNone || (kSegmentLse<MODE> && SK == kScaleNone), "options: a softmax without a scale");
  if constexpr (kSegmentLse<MODE> || FROM_STATS) {
    float sq = 0.f, zs = 0.f;
#pragma omp simd reduction(+ : sq, zs)
    for (int64_t j = 0; j < n; ++j) {
      const float uj = u[j];
      const float s = SK == kScaleClass ? sc[j] : s_seg;
      const float up = scaled_score(uj, inv_nt);
      const float y = logit(uj, s, inv_nt, kBiasFolded<SK, MODE> ? 0.0f : bias[j], inv_t);  // see fold_bias
      float q;
      if constexpr (kSegmentLse<MODE>) {
        float z = DENSE ? t[j] * zscale : 0.f;
        if constexpr (OPTS != kOptsNone) z += uni;
        q = FROM_STATS ? t2 * (zmass * (uj * escale) - z)  // q_softmax with the stored exp
                       : q_softmax<VecMath>(y, lse, zmass, z, t2);
        if constexpr (OPTS == kOptsCap) q *= capf[j];  // (sq and zs below are not read in this mode)
        // every reduction variable is updated in every instance: one that is not makes GCC give up vectorising
        sq += q;
        zs += z;
      } else {
        const float z = DENSE ? teacher_target_sigmoid<VecMath>(t[j], inv_t) : 0.f;
        q = q_sigmoid(sg[j], z);
        sq += q;
        zs += z * y;
      }
      if constexpr (GRAD) write_grad<SK, BIAS_GRAD>(u, j, uj, s, up, q, inv_nt, inv_t, c, s_n2, ds, db);
    }
    return {kSegmentLse<MODE> ? sq : 0.f, zs};
  } else {
    SoftplusLanes sl;
    float zy[SoftplusLanes::kLanes] = {};
    lane_walk(n, sl, [&](int64_t j, int k) __attribute__((always_inline)) {
      const float uj = u[j];
      const float s = SK == kScaleClass ? sc[j] : s_seg;
      const float up = scaled_score(uj, inv_nt);
      const float y = logit(uj, s, inv_nt, bias[j], inv_t);
      float e, inv;
      sl.add(k, y, e, inv);
      const float z = DENSE ? teacher_target_sigmoid<VecMath>(t[j], inv_t) : 0.f;
      zy[k] += z * y;
      const float q = q_sigmoid(y >= 0.0f ? inv : e * inv, z);
      if constexpr (GRAD) write_grad<SK, BIAS_GRAD>(u, j, uj, s, up, q, inv_nt, inv_t, c, s_n2, ds, db);
    });
    float zs = 0.f;
#pragma omp simd reduction(+ : zs)
    for (int k = 0; k < SoftplusLanes::kLanes; ++k) zs += zy[k];
    return {sl.total(), zs};
  }
}

// The bias as the loops read it: under a scale the class prior enters y after the normalisation; a softmax without
// one has it in u already (see fold_bias), so it is 0 here and the compiler drops the load.
template <int SK, LossMode MODE>
inline float bias_of(const float* __restrict bp, int64_t j) {
  if constexpr (kBiasFolded<SK, MODE>) return 0.0f;
  return bp[j];
}

// One row's piece of one segment inside the chunk: what the phases below read and update.
struct RowPiece {
  const SoftTargetChunk& a;
  int64_t b;                 // the row
  int64_t lo, hi, g;         // local columns [lo, hi) of segment g
  int64_t t_begin, t_end;    // the row's sparse targets in this piece: targets[t_begin, t_end)
  float* urow;               // the row's scores (overwritten with the gradient in FINAL)
  const float* trow;         // the row's dense teacher logits, or null
  const float* bp;           // bias of the chunk's columns (zeros when the op has none)
  float* tz;                 // softmax with a dense teacher: the row's teacher exps (see teacher_targets), else null
  float* sg;                 // sigmoid under a scale: the row's sigmoid(y) from STATS for FINAL (see run_row), or null
  float* cap = nullptr;      // soft-capping: the row's dy/d(u + bias) (see fold_bias), or null
  float* ex = nullptr;       // JSD: the row's exp(y - m) from STATS for MIX (see divergence_row), or null
  double& st(int which) const {
    return a.state[which * a.state_stride + b * a.state_row_stride + g * a.state_segment_stride];
  }
};

// TEACHER: the online log-sum-exp of the dense teacher's t / T over the segment, and TENT = sum exp(t / T - m) t / T
// (KL's loss reads the teacher's entropy from it), summed about m (t / T - m: no cancellation against m s) and
// max-merged like TSUMEXP. The piece's exp(t / T - m) are kept in r.tz: when STATS and FINAL run in the same call (a
// whole segment), its targets are then one multiply each. Returns m.
inline float teacher_phase(const RowPiece& r) {
  const float inv_t = r.a.inv_t;
  float m = -std::numeric_limits<float>::infinity();
  int nan = 0;  // a NaN would vanish in the max: counted here, it poisons the sum (the driver reports it)
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t j = r.lo; j < r.hi; ++j) {
    const float t = r.trow[j];
    m = std::max(m, t * inv_t);
    nan |= t != t;
  }
  float s = 0.f, ent = 0.f;
  const float* __restrict t = r.trow;
  float* __restrict tz = r.tz;
#pragma omp simd reduction(+ : s, ent)
  for (int64_t j = r.lo; j < r.hi; ++j) {
    const float e = teacher_target_softmax<VecMath>(t[j], inv_t, m);
    tz[j] = e;
    s += e;
    ent += e * std::fma(t[j], inv_t, -m);
  }
  if (nan) s = std::numeric_limits<float>::quiet_NaN();
  const MaxMerge<double> f = merge_max<double>(r.st(kTeacherMax), m);
  merge_sum<double>(r.st(kTeacherSumExp), s, f);
  // sum e t/T = sum e (t/T - m) + m s (a piece at -inf has s = 0: no -inf * 0)
  merge_sum<double>(r.st(kTeacherEnt), s > 0.f ? ent + static_cast<double>(m) * s : static_cast<double>(ent), f);
  r.st(kTeacherMax) = f.max;
  return m;
}

// The softmax targets z_j = exp(t_j / T - tlse) of a piece, as r.tz[j] * (returned scale): from the exps the TEACHER
// phase of this call left in r.tz (its max ``m``), else computed here (one exp each, shared by STATS and FINAL).
inline float teacher_targets(const RowPiece& r, bool teacher_ran, float m, double tlse) {
  if (teacher_ran) return static_cast<float>(exp_of(static_cast<double>(m) - tlse));
  const float inv_t = r.a.inv_t, lse = static_cast<float>(tlse);
  const float* __restrict t = r.trow;
  float* __restrict tz = r.tz;
#pragma omp simd
  for (int64_t j = r.lo; j < r.hi; ++j) tz[j] = teacher_target_softmax<VecMath>(t[j], inv_t, lse);
  return 1.0f;
}

// NORM: the segment's sum of squared scores (the self-paced scale's norm).
inline void norm_phase(const RowPiece& r) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = r.lo; j < r.hi; ++j) s += r.urow[j] * r.urow[j];
  r.st(kSumSq) += s;
}

// A softmax without a scale has y = (u + b) / T and dl/du = dl/db, so the bias is added to u once here and its
// three loops (max, exps, gradient) read no bias stream (they see a bias of 0 at compile time, see bias_of); the
// gradient overwrites u anyway. The sigmoid without a scale has one loop: it reads the bias there.
// Soft-capping (kOptsCap) is folded here too: u <- c tanh((u + b) / c), and r.cap[j] = 1 - tanh^2, the factor of
// class j's logit and bias gradients (kept apart: STATS may overwrite u with its exps before FINAL reads it).
template <int SK, LossMode MODE, int OPTS = kOptsNone>
inline void fold_bias(const RowPiece& r) {
  if constexpr (OPTS == kOptsCap) {
    static_assert(kBiasFolded<SK, MODE>, "soft-capping: a softmax without a scale");
    float* __restrict u = r.urow;
    float* __restrict cap = r.cap;
    const float* __restrict bp = r.bp;  // (zeros without a bias)
    const float c = r.a.softcap, inv_c = 1.0f / c;
#pragma omp simd
    for (int64_t j = r.lo; j < r.hi; ++j) {
      const Softcapped v = softcap<VecMath>(u[j] + bp[j], c, inv_c);
      u[j] = v.value;
      cap[j] = v.grad;
    }
  } else if constexpr (kBiasFolded<SK, MODE>) {
    if (r.a.bias != nullptr) {
      float* __restrict u = r.urow;
      const float* __restrict bp = r.bp;
#pragma omp simd
      for (int64_t j = r.lo; j < r.hi; ++j) u[j] += bp[j];
    }
  }
}

// The target sums of STATS into the state.
inline void add_target_sums(const RowPiece& r, float zsum, float zy, float zu, float zyh) {
  r.st(kZSum) += zsum;
  r.st(kZY) += zy;
  r.st(kZU) += zu;
  r.st(kZYScaled) += zyh;
}

// STATS: the target sums, and the softmax log-sum-exp (or sigmoid sums) with the terms the scale's gradient needs.
// STORE (FINAL with a gradient in the same call): softmax without a scale, each score is overwritten by its
// exp(y - m), which FINAL turns into softmax(y) with a multiply; sigmoid under a scale, sigmoid(y) goes to r.sg and
// the softplus sum is counted here, so that FINAL has no exp to compute (see final_loop). Returns m (softmax).
// OPTS: the uniform target adds to every class's z (so to ZSUM and ZY, sparse targets or dense).
template <int SK, LossMode MODE, bool DENSE, bool STORE = false, int OPTS = kOptsNone>
__attribute__((noinline)) float stats_phase(const RowPiece& r, const std::vector<Target>& targets, float inv_nt, float zscale) {
  static_assert(OPTS == kOptsNone || kBiasFolded<SK, MODE>, "options: a softmax without a scale");
  const SoftTargetChunk& a = r.a;
  const int64_t lo = r.lo, hi = r.hi, g = r.g;
  const float inv_t = a.inv_t;
  const float* urow = r.urow;
  const float* trow = kSegmentLse<MODE> ? r.tz : r.trow;
  const float* __restrict bp = r.bp;
  float zsum = 0.f, zy = 0.f, zu = 0.f, zyh = 0.f;
  if constexpr (DENSE && !kSegmentLse<MODE>) {  // (a softmax sums its dense targets in its exp loop below)
#pragma omp simd reduction(+ : zsum, zy, zu, zyh)
    for (int64_t j = lo; j < hi; ++j) {
      const float s = scale_at<SK>(a, g, j);
      const float up = scaled_score(urow[j], inv_nt);
      const float z = teacher_target_sigmoid<VecMath>(trow[j], inv_t);
      zsum += z;
      zy += z * logit(urow[j], s, inv_nt, bias_of<SK, MODE>(bp, j), inv_t);
      zu += z * up;
      zyh += z * (s * up);
    }
  } else if constexpr (!DENSE) {
    for (int64_t t = r.t_begin; t < r.t_end; ++t) {
      const int64_t j = targets[t].col;
      const float v = targets[t].value;
      const float s = scale_at<SK>(a, g, j);
      const float up = scaled_score(urow[j], inv_nt);
      zsum += v;
      zy += v * logit(urow[j], s, inv_nt, bias_of<SK, MODE>(bp, j), inv_t);
      zu += v * up;
      zyh += v * (s * up);
    }
  }
  if constexpr (kSegmentLse<MODE>) {
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = lo; j < hi; ++j)
      m = std::max(m, logit(urow[j], scale_at<SK>(a, g, j), inv_nt, bias_of<SK, MODE>(bp, j), inv_t));
    float se = 0.f, seu = 0.f, sey = 0.f;
    const float uni = OPTS != kOptsNone ? a.uniform_target : 0.0f;
    float* __restrict ur = r.urow;
    const float* __restrict tz = r.tz;
#pragma omp simd reduction(+ : se, seu, sey, zsum, zy, zu, zyh)
    for (int64_t j = lo; j < hi; ++j) {
      const float s = scale_at<SK>(a, g, j);
      const float up = scaled_score(ur[j], inv_nt);
      const float y = logit(ur[j], s, inv_nt, bias_of<SK, MODE>(bp, j), inv_t);
      const float e = VecMath::exp(y - m);
      se += e;
      seu += e * up;
      sey += e * (s * up);
      // the dense targets' sums (sparse ones were summed above; every reduction is updated in every instance, or
      // GCC gives up vectorising)
      const float z = DENSE ? tz[j] * zscale : 0.0f;
      zsum += z;  // (the uniform target's uni * n is added after the loop: n adds of one small value drift)
      zy += (OPTS != kOptsNone ? z + uni : z) * y;
      zu += z * up;
      zyh += z * (s * up);
      if constexpr (STORE) ur[j] = e;
    }
    const MaxMerge<double> f = merge_max<double>(r.st(kMax), m);
    merge_sum<double>(r.st(kSumExp), se, f);
    merge_sum<double>(r.st(kSumExpU), seu, f);
    merge_sum<double>(r.st(kSumExpY), sey, f);
    r.st(kMax) = f.max;
    add_target_sums(r, zsum, zy, zu, zyh);
    if constexpr (OPTS != kOptsNone) r.st(kZSum) += static_cast<double>(uni) * static_cast<double>(hi - lo);
    return m;
  } else if constexpr (STORE) {
    static_assert(SK != kScaleNone, "sigmoid without a scale has no STATS phase");
    // sigmoid(y) kept in r.sg for FINAL, and the loss's softplus sum counted here, from the same exp
    SoftplusLanes sl;
    float squ[SoftplusLanes::kLanes] = {}, sqy[SoftplusLanes::kLanes] = {};
    float* __restrict sgrow = r.sg + lo;
    const float* __restrict ur = urow + lo;
    const float* __restrict bl = bp + lo;
    lane_walk(hi - lo, sl, [&](int64_t i, int k) __attribute__((always_inline)) {
      const float s = scale_at<SK>(a, g, lo + i);
      const float up = scaled_score(ur[i], inv_nt);
      const float y = logit(ur[i], s, inv_nt, bl[i], inv_t);
      float e, inv;
      sl.add(k, y, e, inv);
      const float sgm = y >= 0.0f ? inv : e * inv;  // = sigmoid<VecMath>(y)
      sgrow[i] = sgm;
      squ[k] += sgm * up;
      sqy[k] += sgm * (s * up);
    });
    float su = 0.f, sy = 0.f;
#pragma omp simd reduction(+ : su, sy)
    for (int k = 0; k < SoftplusLanes::kLanes; ++k) {
      su += squ[k];
      sy += sqy[k];
    }
    r.st(kSumExpU) += su;
    r.st(kSumExpY) += sy;
    a.softplus_sum[r.b] += sl.total();
  } else {
    float squ = 0.f, sqy = 0.f;
#pragma omp simd reduction(+ : squ, sqy)
    for (int64_t j = lo; j < hi; ++j) {
      const float s = scale_at<SK>(a, g, j);
      const float up = scaled_score(urow[j], inv_nt);
      const float sg = sigmoid<VecMath>(logit(urow[j], s, inv_nt, bias_of<SK, MODE>(bp, j), inv_t));
      squ += sg * up;
      sqy += sg * (s * up);
    }
    r.st(kSumExpU) += squ;
    r.st(kSumExpY) += sqy;
  }
  add_target_sums(r, zsum, zy, zu, zyh);
  return 0.f;
}

// FINAL: loss terms that are sums of elementwise functions, and (with coef) the gradient written over the scores.
// ``from_stats``: the STATS phase of this call stored what the gradient loop reads (see stats_phase).
// OPTS: the z-loss's gradient enters as the mass m + 2 z_loss lse / T^2; every target gets the uniform one; under
// soft-capping each class's gradient (the sparse targets' corrections too) is times r.cap[j].
template <int SK, LossMode MODE, bool DENSE, int OPTS = kOptsNone>
void final_phase(const RowPiece& r, const std::vector<Target>& targets, float inv_nt, float zscale, bool from_stats,
                 float m, double* dscale_acc, float* dbias_acc, std::vector<float>& corr) {
  const SoftTargetChunk& a = r.a;
  const int64_t lo = r.lo, hi = r.hi, g = r.g, b = r.b;
  const bool need_stats = kSegmentLse<MODE> || SK != kScaleNone;
  const float inv_t = a.inv_t, t2 = a.t2;
  float* urow = r.urow;
  const float* __restrict bp = r.bp;
  float lse = 0.f, escale = 0.f, zmass = 0.f, s_n2 = 0.f;
  if constexpr (kSegmentLse<MODE>) {
    const double lse_d = log_sum_exp<double>(r.st(kMax), r.st(kSumExp));
    lse = static_cast<float>(lse_d);
    escale = static_cast<float>(exp_of(static_cast<double>(m) - lse_d));
    zmass = static_cast<float>(OPTS != kOptsNone ? z_loss_mass<double>(r.st(kZSum), a.z_loss, lse_d, t2)
                                                 : r.st(kZSum));
  }
  if constexpr (SK != kScaleNone) {
    const ScaleGradTerms<double> rs =
        LossTerms<MODE>::template scale_grad_terms<double>(t2, r.st(kZSum), r.st(kSumExp),
                                                               r.st(kSumExpU), r.st(kSumExpY), r.st(kZU),
                                                               r.st(kZYScaled));
    r.st(kR) = rs.R;
    r.st(kS) = rs.S;
    s_n2 = static_cast<float>(rs.S * inv_norm_sq<double>(r.st(kSumSq)));
  }
  const float dqz = LossTerms<MODE>::dq_dz(t2);
  const float c = a.coef ? a.coef[b] : 0.f;

  // sparse targets: -z y in the loss, and gradient corrections read before u is overwritten
  if constexpr (!DENSE) {
    float zy = 0.f;
    for (int64_t t = r.t_begin; t < r.t_end; ++t) {
      const int64_t j = targets[t].col;
      const float v = targets[t].value;
      const float s = scale_at<SK>(a, g, j);
      const float up = scaled_score(urow[j], inv_nt);
      zy += v * logit(urow[j], s, inv_nt, bias_of<SK, MODE>(bp, j), inv_t);
      corr[t] = c * dqz * v * s * inv_nt;  // coef (dq/dz) v a_j
      if constexpr (OPTS == kOptsCap) corr[t] *= r.cap[j];
      if (SK == kScaleClass && a.coef) dscale_acc[j] += static_cast<double>(c) * dqz * v * up;
    }
    if (!need_stats) r.st(kZY) += zy;
  }

  const float* sc = SK == kScaleClass ? a.scale + a.col0 + lo : nullptr;
  const float s_seg = SK == kScaleSegment ? a.scale[g] : 1.0f;
  const float* tp = DENSE ? (kSegmentLse<MODE> ? r.tz : r.trow) + lo : nullptr;
  const float uni = OPTS != kOptsNone ? a.uniform_target : 0.f;
  const float* capf = OPTS == kOptsCap ? r.cap + lo : nullptr;
  FinalSums sums;
  if (a.coef == nullptr) {
    if constexpr (kSegmentLse<MODE>) return;  // the softmax loss comes from the statistics alone
    sums = final_loop<SK, MODE, DENSE, false, false>(urow + lo, tp, nullptr, sc, bp + lo, hi - lo, s_seg, inv_nt,
                                                       inv_t, t2, zscale, lse, escale, zmass, 0.f, s_n2, nullptr,
                                                       nullptr);
  } else {
    double* ds = dscale_acc + lo;
    float* db = dbias_acc ? dbias_acc + lo : nullptr;
    const float* sg = r.sg ? r.sg + lo : nullptr;
    // the gradient loop with or without the bias gradient, FROM_STATS given as a std::bool_constant
    const auto grad_loop = [&](auto from_stats_c) {
      constexpr bool kFrom = decltype(from_stats_c)::value;
      return db ? final_loop<SK, MODE, DENSE, true, true, kFrom, OPTS>(urow + lo, tp, sg, sc, bp + lo, hi - lo,
                                                                          s_seg, inv_nt, inv_t, t2, zscale, lse,
                                                                          escale, zmass, c, s_n2, ds, db, uni, capf)
                : final_loop<SK, MODE, DENSE, true, false, kFrom, OPTS>(urow + lo, tp, sg, sc, bp + lo, hi - lo,
                                                                           s_seg, inv_nt, inv_t, t2, zscale, lse,
                                                                           escale, zmass, c, s_n2, ds, nullptr, uni,
                                                                           capf);
    };
    if constexpr (kStatsStores<SK, MODE>) {
      sums = from_stats ? grad_loop(std::true_type{}) : grad_loop(std::false_type{});
    } else {
      sums = grad_loop(std::false_type{});
    }
  }
  if constexpr (!kSegmentLse<MODE>) {
    a.softplus_sum[b] += sums.sp;
    if (DENSE && !need_stats) r.st(kZY) += sums.zy;
  }
  if (a.coef == nullptr) return;
  if constexpr (!DENSE) {
    for (int64_t t = r.t_begin; t < r.t_end; ++t) {
      urow[targets[t].col] += corr[t];
      // the bias gradient's correction is coef (dq/dz) v / T, which differs from the logit's under the scale
      float dq = dqz * targets[t].value;
      if constexpr (OPTS == kOptsCap) dq *= r.cap[targets[t].col];
      if (dbias_acc) dbias_acc[targets[t].col] += bias_grad(c, dq, inv_t);
    }
  }
}


// ---- the divergence modes (reverse KL, JSD): a dense teacher, no scale, the bias folded into u (y = u / T)
//
// Per row and piece, after TEACHER: STATS (MAX, SUMEXP, and for reverse KL DIV = sum exp(y - m) (y - t/T)), MIX
// (JSD: DLOSS and DIV over the mixture, from the finished lse and tlse), FINAL (the gradient from DBAR). STORE (all
// of them in one call with a gradient): the last phase before FINAL leaves in u the student's exp (reverse KL:
// exp(y - m); JSD: p) and in the row buffer tz the log ratio FINAL reads (reverse KL: y - t/T; JSD: lp - lm), so
// FINAL has no exp or log and no teacher to read. STASH (JSD with TEACHER, STATS and MIX in one call): MIX takes z
// from the teacher's exps TEACHER left in tz and p from the exps STATS leaves in the row buffer ex, so its only exp
// is the mixture's (3 exps a logit in all instead of 5).
template <LossMode MODE>
constexpr bool kDivergence = LossTerms<MODE>::kDenseTeacher;

// STATS of a divergence mode. Returns the piece's max of y.
template <LossMode MODE, bool STORE, bool STASH = false>
__attribute__((noinline)) float divergence_stats(const RowPiece& r) {
  const int64_t lo = r.lo, hi = r.hi;
  const float inv_t = r.a.inv_t;
  float* __restrict u = r.urow;
  const float* __restrict t = r.trow;
  float* __restrict tz = r.tz;
  float* __restrict ex = r.ex;
  const float m = lane_max(lo, hi, -std::numeric_limits<float>::infinity(),
                           [&](int64_t j) __attribute__((always_inline)) { return u[j] * inv_t; });
  float se = 0.f, dv = 0.f;
#pragma omp simd reduction(+ : se, dv)
  for (int64_t j = lo; j < hi; ++j) {
    const float y = u[j] * inv_t;
    const float e = VecMath::exp(y - m);
    se += e;
    if constexpr (STASH) ex[j] = e;
    if constexpr (LossTerms<MODE>::kStatsDiv) {
      const float d = y - t[j] * inv_t;
      dv += e * d;
      if constexpr (STORE) {
        u[j] = e;
        tz[j] = d;
      }
    }
  }
  const MaxMerge<double> f = merge_max<double>(r.st(kMax), m);
  merge_sum<double>(r.st(kSumExp), se, f);
  if constexpr (LossTerms<MODE>::kStatsDiv) merge_sum<double>(r.st(kDiv), dv, f);
  r.st(kMax) = f.max;
  return m;
}

// MIX (JSD): DLOSS += sum beta z (lz - lm) + (1 - beta) p (lp - lm), DIV += sum p (lp - lm) over the piece.
// STASH: z = tz * zscale and p = ex * escale (see above).
template <bool STORE, bool STASH>
__attribute__((noinline)) void jsd_mix(const RowPiece& r, float lse, float tlse, float zscale, float escale) {
  const SoftTargetChunk& a = r.a;
  const float inv_t = a.inv_t, beta = a.beta;
  const float log_beta = static_cast<float>(std::log(static_cast<double>(beta)));
  const float log_1mbeta = static_cast<float>(std::log1p(-static_cast<double>(beta)));
  float* __restrict u = r.urow;
  const float* __restrict t = r.trow;
  float* __restrict tz = r.tz;
  const float* __restrict ex = r.ex;
  float dl = 0.f, dv = 0.f;
#pragma omp simd reduction(+ : dl, dv)
  for (int64_t j = r.lo; j < r.hi; ++j) {
    const float lz = t[j] * inv_t - tlse, lp = u[j] * inv_t - lse;
    const JsdElement el = STASH ? jsd_element_of<VecMath>(lz, lp, tz[j] * zscale, ex[j] * escale, beta, log_beta,
                                                          log_1mbeta)
                                : jsd_element<VecMath>(lz, lp, beta, log_beta, log_1mbeta);
    dl += el.loss;
    dv += el.div;
    if constexpr (STORE) {
      u[j] = el.p;
      tz[j] = el.dlp;
    }
  }
  r.st(kDivLoss) += dl;
  r.st(kDiv) += dv;
}

// FINAL of a divergence mode with a gradient: u <- coef q / T, the bias gradient's column terms into db.
// FROM_STATS: u holds the student's exp (times escale: reverse KL's exp(m - lse); JSD's p as it is) and d the log
// ratio (see above); else both are computed here from u and the teacher t.
template <LossMode MODE, bool BIAS_GRAD, bool FROM_STATS>
__attribute__((noinline)) void divergence_final_loop(float* __restrict u, const float* __restrict t,
                                                     const float* __restrict d, int64_t n, float inv_t,
                                                     float qscale, float lse, float tlse, float escale, float dbar,
                                                     float beta, float c, float* __restrict db) {
  const float log_beta = static_cast<float>(std::log(static_cast<double>(beta)));
  const float log_1mbeta = static_cast<float>(std::log1p(-static_cast<double>(beta)));
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float q;
    if constexpr (LossTerms<MODE>::kStatsDiv) {  // reverse KL
      if constexpr (FROM_STATS) {
        q = q_reverse_kl(u[j] * escale, d[j], dbar, qscale);
      } else {
        const float y = u[j] * inv_t;
        q = q_reverse_kl(VecMath::exp(y - lse), y - t[j] * inv_t, dbar, qscale);
      }
    } else {  // JSD
      if constexpr (FROM_STATS) {
        q = q_jsd(u[j], d[j], dbar, qscale);
      } else {
        const JsdElement el =
            jsd_element<VecMath>(t[j] * inv_t - tlse, u[j] * inv_t - lse, beta, log_beta, log_1mbeta);
        q = q_jsd(el.p, el.dlp, dbar, qscale);
      }
    }
    u[j] = logit_grad_unscaled(c, q, inv_t);
    if constexpr (BIAS_GRAD) db[j] += bias_grad(c, q, inv_t);
  }
}

template <LossMode MODE>
void divergence_final(const RowPiece& r, bool from_stats, float m, float* dbias_acc) {
  const SoftTargetChunk& a = r.a;
  const int64_t lo = r.lo, n = r.hi - r.lo;
  const double lse_d = log_sum_exp<double>(r.st(kMax), r.st(kSumExp));
  const double tlse_d = log_sum_exp<double>(r.st(kTeacherMax), r.st(kTeacherSumExp));
  const float lse = static_cast<float>(lse_d), tlse = static_cast<float>(tlse_d);
  const float escale = static_cast<float>(exp_of(static_cast<double>(m) - lse_d));
  const float dbar = static_cast<float>(LossTerms<MODE>::template dbar<double>(r.st(kDiv), r.st(kSumExp)));
  const float qscale = LossTerms<MODE>::kMix ? a.t2 * (1.0f - a.beta) : a.t2;
  const float c = a.coef[r.b];
  float* u = r.urow + lo;
  const float* t = r.trow + lo;
  const float* d = r.tz + lo;
  float* db = dbias_acc ? dbias_acc + lo : nullptr;
  const auto loop = [&](auto from_c) {
    constexpr bool kFrom = decltype(from_c)::value;
    if (db)
      divergence_final_loop<MODE, true, kFrom>(u, t, d, n, a.inv_t, qscale, lse, tlse, escale, dbar, a.beta, c, db);
    else
      divergence_final_loop<MODE, false, kFrom>(u, t, d, n, a.inv_t, qscale, lse, tlse, escale, dbar, a.beta, c,
                                                 nullptr);
  };
  from_stats ? loop(std::true_type{}) : loop(std::false_type{});
}

// One row of a divergence mode: the requested phases, piece by piece (see run_row).
template <LossMode MODE>
void divergence_row(const SoftTargetChunk& a, int64_t b, float* urow, const float* bias, float* dbias_acc,
                    float* tz, float* ex) {
  constexpr bool kMix = LossTerms<MODE>::kMix;
  const int before_final = kMix ? kPhaseMix : kPhaseStats;  // the phase that can STORE for FINAL
  const bool store = a.coef != nullptr && (a.phases & before_final) && (a.phases & kPhaseFinal);
  for (int64_t p = 0; p < a.npieces; ++p) {
    const RowPiece r{a, b, a.piece_lo[p], a.piece_lo[p + 1], a.piece_seg[p], 0, 0, urow,
                     a.teacher + b * a.teacher_ld, bias, tz, nullptr, nullptr, ex};
    const bool teacher_ran = a.phases & kPhaseTeacher;
    const float tmax = teacher_ran ? teacher_phase(r) : 0.f;
    if (!(a.phases & (kPhaseStats | kPhaseMix | kPhaseFinal))) continue;
    fold_bias<kScaleNone, MODE>(r);
    float m = 0.f;
    const bool stash = kMix && teacher_ran && (a.phases & kPhaseStats) && (a.phases & kPhaseMix);
    if (a.phases & kPhaseStats) {
      if constexpr (kMix) {
        m = stash ? divergence_stats<MODE, false, true>(r) : divergence_stats<MODE, false>(r);
      } else {
        m = store ? divergence_stats<MODE, true>(r) : divergence_stats<MODE, false>(r);
      }
    }
    if constexpr (kMix) {
      if (a.phases & kPhaseMix) {
        const double lse_d = log_sum_exp<double>(r.st(kMax), r.st(kSumExp));
        const double tlse_d = log_sum_exp<double>(r.st(kTeacherMax), r.st(kTeacherSumExp));
        const float lse = static_cast<float>(lse_d), tlse = static_cast<float>(tlse_d);
        if (stash) {
          const float zscale = static_cast<float>(exp_of(static_cast<double>(tmax) - tlse_d));
          const float escale = static_cast<float>(exp_of(static_cast<double>(m) - lse_d));
          store ? jsd_mix<true, true>(r, lse, tlse, zscale, escale)
                : jsd_mix<false, true>(r, lse, tlse, zscale, escale);
        } else {
          store ? jsd_mix<true, false>(r, lse, tlse, 0.f, 0.f) : jsd_mix<false, false>(r, lse, tlse, 0.f, 0.f);
        }
      }
    }
    if ((a.phases & kPhaseFinal) && a.coef != nullptr) divergence_final<MODE>(r, store, m, dbias_acc);
  }
}

// One row of the chunk: the requested phases, piece by piece, while the row is in cache.
// ``urow`` is the row's fp32 scores: the buffer itself, or the fp32 copy of a bf16 row (see run). ``tz``: a row of
// ncols floats for the teacher exps (softmax with a dense teacher), else null; ``sg``: a row of ncols floats for the
// sigmoids (sigmoid under a scale), else null; ``cap``: a row of ncols floats for the soft-cap's derivatives
// (kOptsCap), else null.
template <int SK, LossMode MODE, bool DENSE, int OPTS = kOptsNone>
void run_row(const SoftTargetChunk& a, int64_t b, float* urow, const std::vector<Target>& targets,
             const std::vector<int64_t>& piece_first, const float* bias, double* dscale_acc, float* dbias_acc,
             std::vector<float>& corr, float* tz, float* sg, float* cap = nullptr) {
  const bool need_stats = kSegmentLse<MODE> || SK != kScaleNone;
  // a whole segment in one call with a gradient wanted: softmax without a scale, STATS leaves exp(y - m) for FINAL;
  // sigmoid under a scale, sigmoid(y) (and counts the loss)
  const bool store = kStatsStores<SK, MODE> && a.coef != nullptr && (a.phases & kPhaseStats) && (a.phases & kPhaseFinal);
  for (int64_t p = 0; p < a.npieces; ++p) {
    const RowPiece r{a,
                     b,
                     a.piece_lo[p],
                     a.piece_lo[p + 1],
                     a.piece_seg[p],
                     piece_first[p],
                     piece_first[p + 1],
                     urow,
                     DENSE ? a.teacher + b * a.teacher_ld : nullptr,
                     bias,
                     tz,
                     sg,
                     cap};
    const bool teacher_ran = kSegmentLse<MODE> && DENSE && (a.phases & kPhaseTeacher);
    const float tmax = teacher_ran ? teacher_phase(r) : 0.f;
    if (SK != kScaleNone && (a.phases & kPhaseNorm)) norm_phase(r);
    if (!(a.phases & (kPhaseStats | kPhaseFinal))) continue;

    const float inv_nt = static_cast<float>(inv_norm_t<double>(SK != kScaleNone, r.st(kSumSq), a.inv_t));
    float zscale = 0.f;
    if constexpr (kSegmentLse<MODE> && DENSE)
      zscale = teacher_targets(r, teacher_ran, tmax, log_sum_exp<double>(r.st(kTeacherMax), r.st(kTeacherSumExp)));
    fold_bias<SK, MODE, OPTS>(r);
    float m = 0.f;
    if (need_stats && (a.phases & kPhaseStats)) {
      if constexpr (kStatsStores<SK, MODE>) {
        m = store ? stats_phase<SK, MODE, DENSE, true, OPTS>(r, targets, inv_nt, zscale)
                  : stats_phase<SK, MODE, DENSE, false, OPTS>(r, targets, inv_nt, zscale);
      } else {
        m = stats_phase<SK, MODE, DENSE>(r, targets, inv_nt, zscale);
      }
    }
    if (a.phases & kPhaseFinal)
      final_phase<SK, MODE, DENSE, OPTS>(r, targets, inv_nt, zscale, store, m, dscale_acc, dbias_acc, corr);
  }
}

// The row of a sigmoid or softmax (run_row) or of a divergence mode (divergence_row).
template <int SK, LossMode MODE, bool DENSE, int OPTS>
KC_VEC_INLINE void row_of_mode(const SoftTargetChunk& a, int64_t b, float* urow, const std::vector<Target>& targets,
                               const std::vector<int64_t>& piece_first, const float* bias, double* dscale_acc,
                               float* dbias_acc, std::vector<float>& corr, float* tz, float* sg, float* cap,
                               float* ex) {
  if constexpr (kDivergence<MODE>) {
    static_assert(SK == kScaleNone && DENSE && OPTS == kOptsNone, "a divergence mode: dense teacher, no scale");
    divergence_row<MODE>(a, b, urow, bias, dbias_acc, tz, ex);
  } else {
    run_row<SK, MODE, DENSE, OPTS>(a, b, urow, targets, piece_first, bias, dscale_acc, dbias_acc, corr, tz, sg, cap);
  }
}

constexpr int kBiasFoldRows = 32;

// acc += part, part = 0.
inline void fold_into(double* __restrict acc, float* __restrict part, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    acc[j] += part[j];
    part[j] = 0.f;
  }
}

// Scores of type T (float, or bf16 as uint16_t). bf16 rows are widened into a per-thread fp32 row buffer, every phase
// runs on it exactly as on fp32 scores, and after a FINAL phase with coef the fp32 logit gradient is rounded back into
// the bf16 row (once: the sparse targets' corrections are added in fp32 before the rounding).
template <int SK, LossMode MODE, bool DENSE, class T, int OPTS = kOptsNone>
void run(const SoftTargetChunk& a) {
  constexpr bool kWide = std::is_same_v<T, uint16_t>;
  const bool reads_u = (a.phases & ~kPhaseTeacher) != 0;
  const bool writes_u = a.coef != nullptr && (a.phases & kPhaseFinal);
  const int64_t ncols = a.ncols;
  const bool class_grad = SK == kScaleClass && a.coef != nullptr && (a.phases & kPhaseFinal);
  const bool want_dbias = a.dbias != nullptr && a.coef != nullptr && (a.phases & kPhaseFinal);
  // the bias of the chunk's columns; zeros when the op has none, so that the vector loops have no branch on it
  std::vector<float> zero_bias(a.bias == nullptr ? ncols : 0, 0.f);
  const float* bias = a.bias != nullptr ? a.bias + a.col0 : zero_bias.data();
#pragma omp parallel
  {
    std::vector<double> dscale_acc(class_grad ? ncols : 0, 0.0);
    // the bias gradient's column sums, per thread (rows are split across threads): each row's terms go into float
    // sums that are folded into double ones every kBiasFoldRows rows (a double add per logit in the gradient loop
    // halved its vector width)
    std::vector<double> dbias_acc(want_dbias ? ncols : 0, 0.0);
    std::vector<float> dbias_rows(want_dbias ? ncols : 0, 0.f);
    int rows_unfolded = 0;
    std::vector<Target> targets;
    std::vector<int64_t> piece_first(a.npieces + 1, 0);
    std::vector<float> corr;
    std::vector<float> row_f32(kWide && reads_u ? ncols : 0);
    std::vector<float> tz(kSegmentLse<MODE> && DENSE ? ncols : 0);
    std::vector<float> sg(!kSegmentLse<MODE> && SK != kScaleNone ? ncols : 0);
    std::vector<float> cap(OPTS == kOptsCap ? ncols : 0);
    std::vector<float> ex(LossTerms<MODE>::kMix ? ncols : 0);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < a.rows; ++b) {
      targets.clear();
      if (!DENSE && a.k > 0) {
        // the row's targets that fall in this chunk, grouped by piece (counting sort)
        const int64_t* idx = a.tidx + b * a.k;
        const float* val = a.tval + b * a.k;
        std::fill(piece_first.begin(), piece_first.end(), 0);
        std::vector<Target> found;
        for (int64_t t = 0; t < a.k; ++t) {
          const int64_t j = idx[t] - a.col0;
          if (idx[t] < 0 || j < 0 || j >= ncols) continue;
          const int64_t p = std::upper_bound(a.piece_lo, a.piece_lo + a.npieces + 1, j) - a.piece_lo - 1;
          found.push_back({j, p, val[t]});
          ++piece_first[p + 1];
        }
        for (int64_t p = 0; p < a.npieces; ++p) piece_first[p + 1] += piece_first[p];
        targets.resize(found.size());
        std::vector<int64_t> fill(piece_first.begin(), piece_first.end() - 1);
        for (const Target& t : found) targets[fill[t.piece]++] = t;
        corr.assign(targets.size(), 0.f);
      } else {
        std::fill(piece_first.begin(), piece_first.end(), 0);
      }
      T* const scores = static_cast<T*>(a.u) + b * a.ld;
      float* urow = nullptr;
      if constexpr (kWide) {
        if (reads_u) {
          bf16_row_to_float(scores, row_f32.data(), ncols);
          urow = row_f32.data();
        }
      } else {
        urow = scores;
      }
      row_of_mode<SK, MODE, DENSE, OPTS>(a, b, urow, targets, piece_first, bias, dscale_acc.data(),
                                         want_dbias ? dbias_rows.data() : nullptr, corr, tz.data(), sg.data(),
                                         cap.data(), ex.data());
      if (want_dbias && ++rows_unfolded == kBiasFoldRows) {
        fold_into(dbias_acc.data(), dbias_rows.data(), ncols);
        rows_unfolded = 0;
      }
      if constexpr (kWide) {
        if (writes_u) float_row_to_bf16(row_f32.data(), scores, ncols);
      }
    }
    if (class_grad && a.dscale_class != nullptr) {  // null: the scale needs no gradient (accumulated all the same)
#pragma omp critical
      for (int64_t j = 0; j < ncols; ++j) a.dscale_class[j] += static_cast<float>(dscale_acc[j]);
    }
    if (want_dbias) {
      fold_into(dbias_acc.data(), dbias_rows.data(), ncols);
#pragma omp critical
      for (int64_t j = 0; j < ncols; ++j) a.dbias[j] += static_cast<float>(dbias_acc[j]);
    }
  }
}

inline bool has_options(const SoftTargetChunk& a) {
  return a.softcap != 0.f || a.z_loss != 0.f || a.uniform_target != 0.f;
}

[[noreturn]] inline void refuse_options(const SoftTargetChunk& a) {
  throw std::invalid_argument(std::string("soft_target_chunk: softcap, z_loss and uniform_target are options of "
                                          "SOFTMAX and KL, not of mode ") + kLossModeNames[a.mode]);
}

// The softmax instance of a call: its options (if any) pick an instance of their own (only without a scale).
template <int SK, bool DENSE, class T>
void run_softmax(const SoftTargetChunk& a) {
  const bool opts = has_options(a);
  if constexpr (SK == kScaleNone) {
    if (a.softcap != 0.f) return run<SK, kModeSoftmax, DENSE, T, kOptsCap>(a);
    if (opts) return run<SK, kModeSoftmax, DENSE, T, kOptsTargets>(a);
  } else if (opts) {
    throw std::invalid_argument("soft_target_chunk: softcap, z_loss and uniform_target take no scale");
  }
  run<SK, kModeSoftmax, DENSE, T>(a);
}

// A divergence mode: a dense teacher and no scale (the bindings check both before the kernel runs).
template <int SK, LossMode MODE, class T>
void run_divergence(const SoftTargetChunk& a) {
  if (has_options(a)) refuse_options(a);
  if constexpr (SK == kScaleNone) {
    if (a.teacher == nullptr && (a.phases & ~kPhaseTeacher))
      throw std::invalid_argument(std::string("soft_target_chunk: mode ") + kLossModeNames[MODE] +
                                  " reads a dense teacher (got teacher 0)");
    run<SK, MODE, true, T>(a);
  } else {
    throw std::invalid_argument(std::string("soft_target_chunk: mode ") + kLossModeNames[MODE] +
                                " takes no scale");
  }
}

template <int SK, class T>
void dispatch_mode(const SoftTargetChunk& a) {
  const bool dense = a.teacher != nullptr;
  switch (a.mode) {
    case kModeSigmoid:
      if (has_options(a)) refuse_options(a);
      dense ? run<SK, kModeSigmoid, true, T>(a) : run<SK, kModeSigmoid, false, T>(a);
      break;
    case kModeSoftmax:
    case kModeKL:  // SOFTMAX's walk and gradient (its loss differs in the driver only)
      dense ? run_softmax<SK, true, T>(a) : run_softmax<SK, false, T>(a);
      break;
    case kModeReverseKL:
      run_divergence<SK, kModeReverseKL, T>(a);
      break;
    case kModeJSD:
      run_divergence<SK, kModeJSD, T>(a);
      break;
    default:
      throw std::invalid_argument("soft_target_chunk: mode " + std::to_string(a.mode) + " is not a LOSS_MODES value");
  }
}

// The epilogue over scores of storage type T (float, or bf16 as uint16_t).
template <class T>
void soft_target_chunk_as(const SoftTargetChunk& a) {
  switch (a.scale_kind) {
    case kScaleSegment:
      dispatch_mode<kScaleSegment, T>(a);
      break;
    case kScaleClass:
      dispatch_mode<kScaleClass, T>(a);
      break;
    default:
      dispatch_mode<kScaleNone, T>(a);
  }
}

}  // namespace

void soft_target_chunk_bf16(const SoftTargetChunk& a);  // soft_target_bf16.cpp

}  // namespace kc_cpu
