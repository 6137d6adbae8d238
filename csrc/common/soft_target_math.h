// Per-element and per-(row, segment) math of the soft-target epilogue (docs/epilogue.md, "Math"), shared by the
// CPU epilogue (csrc/cpu/soft_target_impl.h) and the CUDA one (csrc/cuda/soft_target.cu) so both evaluate the same
// formulas in the same order.
//
// The per-element functions sit inside the CPU's `omp simd` loops, so they are branch-free (selects only) and take
// exp and log1p from a math policy `M` with static members `exp(float)` and `log1p_unit(float)` (log1p on [0, 1]):
// the CPU passes its vectorisable polynomials (kc_cpu::VecMath), the GPU its hardware intrinsics (CudaMath below).
// libm's scalar expf would stop GCC from vectorising those loops.
//
// Notation per row and segment: u the raw score x.w_j, s the self-paced scale (1 without one), inv_nt = 1/(nT)
// (1/T without a scale), up = u/(nT), yh = s up (the scaled part of the logit), y = yh + bias/T, z the target.
#pragma once

#include <math.h>

#include "common/soft_target_layout.h"

#ifdef __CUDACC__
#define KC_HD __host__ __device__ __forceinline__
#else
// always inlined: inside the CPU's omp simd loops a call that the inliner declined (its growth budget runs out in
// the large OpenMP bodies that instantiate many loops) stops the loop from vectorising
#define KC_HD inline __attribute__((always_inline))
#endif

namespace kc {

constexpr double kNormEps = 1e-12;  // n = sqrt(sum u^2 + eps): a zero score row keeps a finite scale

// The loss family, one X-macro list (C++ name, name exported to Python as LOSS_MODES): the Python IntEnum
// kc_kernels.loss_modes.LossMode and the Triton constants (kc_kernels/triton/loss_modes.py) must agree with it
// (tests/test_layout.py). A mode's per-element terms are the LossTerms specialisation below; adding a mode:
// docs/architecture.md, "Adding a loss mode".
#define KC_LOSS_MODES(X)                                                          \
  X(kModeSigmoid, "SIGMOID")       /* binary cross-entropy per class */           \
  X(kModeSoftmax, "SOFTMAX")       /* cross-entropy per segment, times T^2 */     \
  X(kModeKL, "KL")                 /* KL(teacher || student): SOFTMAX's walk */   \
  X(kModeReverseKL, "REVERSE_KL")  /* KL(student || teacher), times T^2 */        \
  X(kModeJSD, "JSD")               /* generalized Jensen-Shannon (beta), T^2 */
enum LossMode { KC_LOSS_MODES(KC_ENUM_ITEM) kNumLossModes };
constexpr const char* kLossModeNames[kNumLossModes] = {KC_LOSS_MODES(KC_ENUM_NAME)};

#ifdef __CUDACC__
// Fast-path intrinsics: __expf is a couple of instructions with ~2 ulp error, enough for probabilities.
struct CudaMath {
  static __device__ __forceinline__ float exp(float x) { return __expf(x); }
  static __device__ __forceinline__ float log1p_unit(float t) { return log1pf(t); }
  static __device__ __forceinline__ float inv_1_2(float x) { return 1.0f / x; }
};
#endif

// ---- per element

struct SoftplusSigmoid {
  float softplus;
  float sigmoid;
};

// softplus(y) = max(y, 0) + log1p(exp(-|y|)) and sigmoid(y), sharing e = exp(-|y|); stable for any y.
template <class M>
KC_HD SoftplusSigmoid softplus_sigmoid(float y) {
  const float e = M::exp(-fabsf(y));
  const float inv = M::inv_1_2(1.0f + e);
  return {(y > 0.0f ? y : 0.0f) + M::log1p_unit(e), y >= 0.0f ? inv : e * inv};
}

template <class M>
KC_HD float softplus(float y) {
  return (y > 0.0f ? y : 0.0f) + M::log1p_unit(M::exp(-fabsf(y)));
}

template <class M>
KC_HD float sigmoid(float y) {
  const float e = M::exp(-fabsf(y));
  const float inv = M::inv_1_2(1.0f + e);
  return y >= 0.0f ? inv : e * inv;
}

// u/(nT): the unit of the scale's gradient and of the ZU / SUMEXP_U statistics.
KC_HD float scaled_score(float u, float inv_nt) { return inv_nt * u; }

// The logit y = s u/(nT) + bias/T: the bias is a class prior outside the normalisation.
KC_HD float logit(float u, float s, float inv_nt, float bias, float inv_t) {
  return fmaf(s, scaled_score(u, inv_nt), bias * inv_t);
}

// Target of a class from a dense teacher logit t: sigmoid(t/T), or softmax over the segment given its
// log-sum-exp tlse = logsumexp(t/T).
template <class M>
KC_HD float teacher_target_sigmoid(float t, float inv_t) {
  return sigmoid<M>(t * inv_t);
}
template <class M>
KC_HD float teacher_target_softmax(float t, float inv_t, float tlse) {
  return M::exp(t * inv_t - tlse);
}

// q = dl/dy. Sigmoid: sigmoid(y) - z. Softmax: T^2 (m softmax(y) - z), with the segment's lse and mass m.
KC_HD float q_sigmoid(float sigmoid_y, float z) { return sigmoid_y - z; }
template <class M>
KC_HD float q_softmax(float y, float lse, float mass, float z, float t2) {
  return t2 * (mass * M::exp(y - lse) - z);
}

// coef dl/du. Under a scale: coef (s/(nT) q - u S/n^2), the second term from the norm; without: coef q/T.
// Each term carries coef before the difference, as the Triton epilogue evaluates it: the terms nearly cancel for a
// row of small norm, and the backends then agree to the last bits.
KC_HD float logit_grad_scaled(float coef, float s, float inv_nt, float q, float u, float s_n2) {
  return coef * q * s * inv_nt - coef * u * s_n2;
}
KC_HD float logit_grad_unscaled(float coef, float q, float inv_t) { return coef * q * inv_t; }
// Column-sum terms: coef dl/dbias = coef q/T, and coef dl/ds_j = coef q u/(nT).
KC_HD float bias_grad(float coef, float q, float inv_t) { return coef * q * inv_t; }
KC_HD float scale_grad(float coef, float q, float up) { return coef * q * up; }

// ---- online max / sum-exp merge (softmax statistics and the teacher's log-sum-exp)

KC_HD float exp_of(float x) { return expf(x); }
KC_HD double exp_of(double x) { return exp(x); }
KC_HD float log_of(float x) { return logf(x); }
KC_HD double log_of(double x) { return log(x); }
KC_HD float sqrt_of(float x) { return sqrtf(x); }
KC_HD double sqrt_of(double x) { return sqrt(x); }

// Merging a part's (max, sums) into a running (max, sums): new_max = max(old, part); each sum becomes
// old_sum * keep_old + part_sum * keep_part. A side at -inf (nothing seen yet) contributes 0, never exp(nan).
template <class T>
struct MaxMerge {
  T max;
  T keep_old;
  T keep_part;
};

template <class T>
KC_HD MaxMerge<T> merge_max(T old_max, T part_max) {
  const T neg_inf = -static_cast<T>(INFINITY);
  const T m = old_max > part_max ? old_max : part_max;
  return {m, old_max == neg_inf ? T(0) : exp_of(old_max - m), part_max == neg_inf ? T(0) : exp_of(part_max - m)};
}

template <class T>
KC_HD void merge_sum(T& running, T part, const MaxMerge<T>& f) {
  running = running * f.keep_old + part * f.keep_part;
}

// ---- per (row, segment): constants of the FINAL phase from the state array

// 1/(nT) with n = sqrt(sum u^2 + eps) under a scale, else 1/T.
template <class T>
KC_HD T inv_norm_t(bool scaled, T sumsq, T inv_t) {
  return scaled ? inv_t / sqrt_of(sumsq + static_cast<T>(kNormEps)) : inv_t;
}

// log-sum-exp from a (max, sum exp(. - max)) pair.
template <class T>
KC_HD T log_sum_exp(T max, T sumexp) {
  return max + log_of(sumexp);
}

// 1/n^2: turns S into the norm's term of the logit gradient.
template <class T>
KC_HD T inv_norm_sq(T sumsq) {
  return T(1) / (sumsq + static_cast<T>(kNormEps));
}

// The segment sums of q that the scale's gradient needs: R = sum q u/(nT) and S = sum q yh. In softmax mode
// q = T^2 (m p - z), so sum q v = T^2 (m sum_exp_v / sum_exp - sum z v); in sigmoid mode sum sigmoid(y) v - sum z v.
template <class T>
struct ScaleGradTerms {
  T R;
  T S;
};

// ---- the loss modes' own terms (the rest of the math above is shared by every mode)

template <LossMode MODE>
struct LossTerms;

// l = sum_j softplus(y_j) - z_j y_j; q = sigmoid(y) - z; a dense teacher's target is sigmoid(t/T).
template <>
struct LossTerms<kModeSigmoid> {
  static constexpr bool kSegmentLse = false;  // no statistics over a segment (but a scale's norm)
  static constexpr bool kTeacherLse = false;  // a dense target needs no teacher log-sum-exp
  static constexpr bool kDenseTeacher = false;  // takes sparse targets as they are (see the divergence modes)
  static constexpr bool kStatsDiv = false;
  static constexpr bool kMix = false;
  static KC_HD float dq_dz(float) { return -1.0f; }  // how a target's value enters q (sparse-target correction)
  template <class M>
  static KC_HD float dense_target(float t, float inv_t, float) { return teacher_target_sigmoid<M>(t, inv_t); }
  template <class T>
  static KC_HD ScaleGradTerms<T> scale_grad_terms(T, T, T, T sumexp_u, T sumexp_y, T zu, T zyh) {
    return {sumexp_u - zu, sumexp_y - zyh};  // sum_j (sigmoid(y_j) - z_j) v_j
  }
};

// l = T^2 sum_g (m_g lse_g(y) - sum z y); q = T^2 (m softmax(y) - z); a dense target is the segment's softmax of t/T.
template <>
struct LossTerms<kModeSoftmax> {
  static constexpr bool kSegmentLse = true;
  static constexpr bool kTeacherLse = true;
  static constexpr bool kDenseTeacher = false;
  static constexpr bool kStatsDiv = false;
  static constexpr bool kMix = false;
  static KC_HD float dq_dz(float t2) { return -t2; }
  template <class M>
  static KC_HD float dense_target(float t, float inv_t, float tlse) {
    return teacher_target_softmax<M>(t, inv_t, tlse);
  }
  // sum q v = T^2 (m sum_exp_v / sum_exp - sum z v)
  template <class T>
  static KC_HD ScaleGradTerms<T> scale_grad_terms(T t2, T zsum, T sumexp, T sumexp_u, T sumexp_y, T zu, T zyh) {
    return {t2 * (zsum * sumexp_u / sumexp - zu), t2 * (zsum * sumexp_y / sumexp - zyh)};
  }
};


// KL(teacher || student) is SOFTMAX's walk and gradient; only its loss differs (the teacher's sum z log z, which the
// driver adds from TENT or from sparse values).
template <>
struct LossTerms<kModeKL> : LossTerms<kModeSoftmax> {};

// ---- the divergence modes (reverse KL, JSD): always a dense teacher, no self-paced scale
//
// Per row and segment: lp_j = y_j - lse, lz_j = t_j / T - tlse, p = exp(lp), z = exp(lz). A term whose log
// difference is at or below kNegligibleLog is 0 (its weight p or z is below e^-100 there): a class at -inf (a masked
// teacher or student logit) then adds 0, as 0 log 0 = 0, and not 0 * -inf. A NaN passes (the select tests d <= .).
constexpr float kNegligibleLog = -100.0f;

// w * d, 0 where d <= kNegligibleLog.
KC_HD float weighted_log_ratio(float w, float d) { return d <= kNegligibleLog ? 0.0f : w * d; }

// log(exp(a) + exp(b)) = max(a, b) + log1p(exp(-|a - b|)); equal infinities give that infinity.
template <class M>
KC_HD float log_add_exp(float a, float b) {
  const float d = a == b ? 0.0f : fabsf(a - b);
  return (a > b ? a : b) + M::log1p_unit(M::exp(-d));
}

// One class of the JSD with M = beta z + (1 - beta) p (log_beta = log(beta), log_1mbeta = log(1 - beta)):
// loss = beta z (lz - lm) + (1 - beta) p (lp - lm), div = p (lp - lm), dlp = lp - lm, p = exp(lp).
struct JsdElement {
  float loss;
  float div;
  float dlp;
  float p;
};

// The same with z = exp(lz) and p = exp(lp) given (e.g. exps an earlier phase kept).
template <class M>
KC_HD JsdElement jsd_element_of(float lz, float lp, float z, float p, float beta, float log_beta, float log_1mbeta) {
  const float lm = log_add_exp<M>(lz + log_beta, lp + log_1mbeta);
  const float dlp = lp - lm;
  const float sp = weighted_log_ratio(p, dlp);
  return {beta * weighted_log_ratio(z, lz - lm) + (1.0f - beta) * sp, sp, dlp, p};
}

template <class M>
KC_HD JsdElement jsd_element(float lz, float lp, float beta, float log_beta, float log_1mbeta) {
  return jsd_element_of<M>(lz, lp, M::exp(lz), M::exp(lp), beta, log_beta, log_1mbeta);
}

// q = dl/dy. Reverse KL: T^2 p ((y - t/T) - DBAR), DBAR = DIV / SUMEXP = sum_j p_j (y_j - t_j/T) (d = y - t/T).
KC_HD float q_reverse_kl(float p, float d, float dbar, float t2) { return t2 * (p * (d - dbar)); }
// JSD: T^2 (1 - beta) p ((lp - lm) - DBAR), DBAR = DIV = sum_j p_j (lp_j - lm_j); t2_1mbeta = T^2 (1 - beta).
KC_HD float q_jsd(float p, float dlp, float dbar, float t2_1mbeta) {
  return t2_1mbeta * weighted_log_ratio(p, dlp - dbar);
}

// Reverse KL, DBAR from the states: (sum exp(y - MAX) (y - t/T)) / (sum exp(y - MAX)).
template <class T>
KC_HD T reverse_kl_dbar(T div, T sumexp) {
  return div / sumexp;
}

// What a mode keeps beyond SOFTMAX's log-sum-exp: DIV in STATS (reverse KL) or the MIX phase (JSD).
template <>
struct LossTerms<kModeReverseKL> {
  static constexpr bool kSegmentLse = true;
  static constexpr bool kTeacherLse = true;
  static constexpr bool kDenseTeacher = true;  // sparse targets reach the kernels as a dense teacher
  static constexpr bool kStatsDiv = true;      // STATS accumulates DIV (max-merged like SUMEXP)
  static constexpr bool kMix = false;
  template <class T>
  static KC_HD T dbar(T div, T sumexp) { return reverse_kl_dbar<T>(div, sumexp); }
};

template <>
struct LossTerms<kModeJSD> {
  static constexpr bool kSegmentLse = true;
  static constexpr bool kTeacherLse = true;
  static constexpr bool kDenseTeacher = true;
  static constexpr bool kStatsDiv = false;
  static constexpr bool kMix = true;  // DLOSS and DIV in MIX, after STATS (lse) and TEACHER (tlse) are complete
  template <class T>
  static KC_HD T dbar(T div, T) { return div; }
};

// ---- the hard-label options of SOFTMAX and KL (no scale): soft-capping, z-loss, a uniform target

// y = c tanh(v / c) with v = u + bias (inv_c = 1 / c) and its derivative dy/dv = 1 - tanh^2 = 4 e / (1 + e)^2,
// e = exp(-2 |v / c|) in (0, 1] (exact to rounding at every |v|, where 1 - (y / c)^2 cancels near saturation).
// tanh: (1 - e) / (1 + e) for |v / c| >= 0.5 (1 - e >= 0.63, so e's rounding stays below an ulp), below it the odd
// Taylor series to x^15 (the x^17 term, 4.5e-9 relative, is dropped). Branch-free: M::exp and M::inv_1_2 only.
struct Softcapped {
  float value;
  float grad;
};

template <class M>
KC_HD Softcapped softcap(float v, float c, float inv_c) {
  const float x = v * inv_c;
  const float ax = fabsf(x);
  const float e = M::exp(-2.0f * ax);
  const float inv = M::inv_1_2(1.0f + e);
  const float x2 = x * x;
  float s = -929569.0f / 638512875.0f;
  s = fmaf(s, x2, 21844.0f / 6081075.0f);
  s = fmaf(s, x2, -1382.0f / 155925.0f);
  s = fmaf(s, x2, 62.0f / 2835.0f);
  s = fmaf(s, x2, -17.0f / 315.0f);
  s = fmaf(s, x2, 2.0f / 15.0f);
  s = fmaf(s, x2, -1.0f / 3.0f);
  const float small = fmaf(s * x2, ax, ax);
  const float th = ax < 0.5f ? small : (1.0f - e) * inv;
  return {c * copysignf(th, x), 4.0f * e * (inv * inv)};
}

// z-loss zl lse^2 per segment: its gradient 2 zl lse p_j enters q = T^2 (m p - z) as the mass m + 2 zl lse / T^2.
template <class T>
KC_HD T z_loss_mass(T mass, T z_loss, T lse, T t2) {
  return mass + T(2) * z_loss * lse / t2;
}

}  // namespace kc
