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

}  // namespace kc
