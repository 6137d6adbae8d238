// Fused epilogue of the chunked linear + soft-target loss (see kc_kernels/chunked.py for the driver).
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

struct FinalSums {
  float sp;  // sigmoid mode: sum softplus(y)
  float zy;  // sigmoid mode: sum z y over dense targets (softmax mode: both unused)
};

// The FINAL phase over one row piece of n classes: loss sums and, when GRAD, u overwritten by c * dL/du. Kept as a
// leaf function over restrict pointers so that the compiler vectorises it for every template instance.
// ``t``: sigmoid mode, the dense teacher's logits; softmax mode, the row's teacher exps (target = t[j] * zscale,
// see teacher_targets). FROM_EXP: u holds exp(y - m) from the STATS phase of the same call (see stats_phase), so
// softmax(y) = u * escale costs a multiply instead of an exp.
template <int SK, bool SOFTMAX, bool DENSE, bool GRAD, bool BIAS_GRAD, bool FROM_EXP = false>
FinalSums final_loop(float* __restrict u, const float* __restrict t, const float* __restrict sc,
                     const float* __restrict bias, int64_t n, float s_seg, float inv_nt, float inv_t, float t2,
                     float zscale, float lse, float escale, float zmass, float c, float s_n2, double* __restrict ds,
                     double* __restrict db) {
  float sp = 0.f, zy = 0.f;
#pragma omp simd reduction(+ : sp, zy)
  for (int64_t j = 0; j < n; ++j) {
    const float uj = u[j];
    const float s = SK == kScaleClass ? sc[j] : s_seg;
    const float up = scaled_score(uj, inv_nt);
    const float y = logit(uj, s, inv_nt, SK != kScaleNone ? bias[j] : 0.0f, inv_t);  // see fold_bias
    float q;
    if constexpr (SOFTMAX) {
      const float z = DENSE ? t[j] * zscale : 0.f;
      if constexpr (FROM_EXP) {
        q = t2 * (zmass * (uj * escale) - z);  // q_softmax with the stored exp
      } else {
        q = q_softmax<VecMath>(y, lse, zmass, z, t2);
      }
      // every reduction variable is updated in every instance: one that is not makes GCC give up vectorising
      sp += q;
      zy += z;
    } else {
      const SoftplusSigmoid f = softplus_sigmoid<VecMath>(y);  // one exp for both
      sp += f.softplus;
      const float z = DENSE ? teacher_target_sigmoid<VecMath>(t[j], inv_t) : 0.f;
      zy += z * y;
      q = q_sigmoid(f.sigmoid, z);
    }
    if constexpr (GRAD) {
      u[j] = SK != kScaleNone ? logit_grad_scaled(c, s, inv_nt, q, uj, s_n2) : logit_grad_unscaled(c, q, inv_t);
      if constexpr (BIAS_GRAD) db[j] += bias_grad(c, q, inv_t);
      if constexpr (SK == kScaleClass) ds[j] += static_cast<double>(c) * q * up;
    }
  }
  return {sp, zy};
}

// The bias as the loops read it: under a scale the class prior enters y after the normalisation; without one it
// has already been added to u (see run_row), so it is 0 here and the compiler drops the load.
template <int SK>
inline float bias_of(const float* __restrict bp, int64_t j) {
  if constexpr (SK == kScaleNone) return 0.0f;
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
  double& st(int which) const { return a.state[(which * a.rows + b) * a.num_segments + g]; }
};

// TEACHER: the online log-sum-exp of the dense teacher's t / T over the segment. The piece's exp(t / T - m) are kept
// in r.tz: when STATS and FINAL run in the same call (a whole segment), its targets are then one multiply each.
// Returns m.
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
  float s = 0.f;
  const float* __restrict t = r.trow;
  float* __restrict tz = r.tz;
#pragma omp simd reduction(+ : s)
  for (int64_t j = r.lo; j < r.hi; ++j) {
    const float e = teacher_target_softmax<VecMath>(t[j], inv_t, m);
    tz[j] = e;
    s += e;
  }
  if (nan) s = std::numeric_limits<float>::quiet_NaN();
  const MaxMerge<double> f = merge_max<double>(r.st(kTeacherMax), m);
  merge_sum<double>(r.st(kTeacherSumExp), s, f);
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

// Without a scale y = (u + b) / T and dl/du = dl/db, so the bias is added to u once here and the loops of STATS and
// FINAL read no bias stream (they see a bias of 0 at compile time, see bias_of); the gradient overwrites u anyway.
template <int SK>
inline void fold_bias(const RowPiece& r) {
  if constexpr (SK == kScaleNone) {
    if (r.a.bias != nullptr) {
      float* __restrict u = r.urow;
      const float* __restrict bp = r.bp;
#pragma omp simd
      for (int64_t j = r.lo; j < r.hi; ++j) u[j] += bp[j];
    }
  }
}

// STATS: the target sums, and the softmax log-sum-exp (or sigmoid sums) with the terms the scale's gradient needs.
// STORE (softmax without a scale, FINAL in the same call): each score is overwritten by its exp(y - m), which FINAL
// turns into softmax(y) with a multiply (see final_loop). Returns m (softmax).
template <int SK, bool SOFTMAX, bool DENSE, bool STORE = false>
float stats_phase(const RowPiece& r, const std::vector<Target>& targets, float inv_nt, float zscale) {
  const SoftTargetChunk& a = r.a;
  const int64_t lo = r.lo, hi = r.hi, g = r.g;
  const float inv_t = a.inv_t;
  const float* urow = r.urow;
  const float* trow = SOFTMAX ? r.tz : r.trow;
  const float* __restrict bp = r.bp;
  float zsum = 0.f, zy = 0.f, zu = 0.f, zyh = 0.f;
  if constexpr (DENSE) {
#pragma omp simd reduction(+ : zsum, zy, zu, zyh)
    for (int64_t j = lo; j < hi; ++j) {
      const float s = scale_at<SK>(a, g, j);
      const float up = scaled_score(urow[j], inv_nt);
      const float z = SOFTMAX ? trow[j] * zscale : teacher_target_sigmoid<VecMath>(trow[j], inv_t);
      zsum += z;
      zy += z * logit(urow[j], s, inv_nt, bias_of<SK>(bp, j), inv_t);
      zu += z * up;
      zyh += z * (s * up);
    }
  } else {
    for (int64_t t = r.t_begin; t < r.t_end; ++t) {
      const int64_t j = targets[t].col;
      const float v = targets[t].value;
      const float s = scale_at<SK>(a, g, j);
      const float up = scaled_score(urow[j], inv_nt);
      zsum += v;
      zy += v * logit(urow[j], s, inv_nt, bias_of<SK>(bp, j), inv_t);
      zu += v * up;
      zyh += v * (s * up);
    }
  }
  r.st(kZSum) += zsum;
  r.st(kZY) += zy;
  r.st(kZU) += zu;
  r.st(kZYScaled) += zyh;
  if constexpr (SOFTMAX) {
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = lo; j < hi; ++j)
      m = std::max(m, logit(urow[j], scale_at<SK>(a, g, j), inv_nt, bias_of<SK>(bp, j), inv_t));
    float se = 0.f, seu = 0.f, sey = 0.f;
    float* __restrict ur = r.urow;
#pragma omp simd reduction(+ : se, seu, sey)
    for (int64_t j = lo; j < hi; ++j) {
      const float s = scale_at<SK>(a, g, j);
      const float up = scaled_score(ur[j], inv_nt);
      const float e = VecMath::exp(logit(ur[j], s, inv_nt, bias_of<SK>(bp, j), inv_t) - m);
      se += e;
      seu += e * up;
      sey += e * (s * up);
      if constexpr (STORE) ur[j] = e;
    }
    const MaxMerge<double> f = merge_max<double>(r.st(kMax), m);
    merge_sum<double>(r.st(kSumExp), se, f);
    merge_sum<double>(r.st(kSumExpU), seu, f);
    merge_sum<double>(r.st(kSumExpY), sey, f);
    r.st(kMax) = f.max;
    return m;
  } else {
    float squ = 0.f, sqy = 0.f;
#pragma omp simd reduction(+ : squ, sqy)
    for (int64_t j = lo; j < hi; ++j) {
      const float s = scale_at<SK>(a, g, j);
      const float up = scaled_score(urow[j], inv_nt);
      const float sg = sigmoid<VecMath>(logit(urow[j], s, inv_nt, bias_of<SK>(bp, j), inv_t));
      squ += sg * up;
      sqy += sg * (s * up);
    }
    r.st(kSumExpU) += squ;
    r.st(kSumExpY) += sqy;
  }
  return 0.f;
}

// FINAL: loss terms that are sums of elementwise functions, and (with coef) the gradient written over the scores.
// ``from_exp``: the STATS phase of this call stored exp(y - m) over the scores (see stats_phase).
template <int SK, bool SOFTMAX, bool DENSE>
void final_phase(const RowPiece& r, const std::vector<Target>& targets, float inv_nt, float zscale, bool from_exp,
                 float m, double* dscale_acc, double* dbias_acc, std::vector<float>& corr) {
  const SoftTargetChunk& a = r.a;
  const int64_t lo = r.lo, hi = r.hi, g = r.g, b = r.b;
  const bool need_stats = SOFTMAX || SK != kScaleNone;
  const float inv_t = a.inv_t, t2 = a.t2;
  float* urow = r.urow;
  const float* __restrict bp = r.bp;
  float lse = 0.f, escale = 0.f, zmass = 0.f, s_n2 = 0.f;
  if constexpr (SOFTMAX) {
    const double lse_d = log_sum_exp<double>(r.st(kMax), r.st(kSumExp));
    lse = static_cast<float>(lse_d);
    escale = static_cast<float>(exp_of(static_cast<double>(m) - lse_d));
    zmass = static_cast<float>(r.st(kZSum));
  }
  if constexpr (SK != kScaleNone) {
    const ScaleGradTerms<double> rs = scale_grad_terms<double>(SOFTMAX, t2, r.st(kZSum), r.st(kSumExp),
                                                               r.st(kSumExpU), r.st(kSumExpY), r.st(kZU),
                                                               r.st(kZYScaled));
    r.st(kR) = rs.R;
    r.st(kS) = rs.S;
    s_n2 = static_cast<float>(rs.S * inv_norm_sq<double>(r.st(kSumSq)));
  }
  const float dqz = dq_dz(SOFTMAX, t2);
  const float c = a.coef ? a.coef[b] : 0.f;

  // sparse targets: -z y in the loss, and gradient corrections read before u is overwritten
  if constexpr (!DENSE) {
    float zy = 0.f;
    for (int64_t t = r.t_begin; t < r.t_end; ++t) {
      const int64_t j = targets[t].col;
      const float v = targets[t].value;
      const float s = scale_at<SK>(a, g, j);
      const float up = scaled_score(urow[j], inv_nt);
      zy += v * logit(urow[j], s, inv_nt, bias_of<SK>(bp, j), inv_t);
      corr[t] = c * dqz * v * s * inv_nt;  // coef (dq/dz) v a_j
      if (SK == kScaleClass && a.coef) dscale_acc[j] += static_cast<double>(c) * dqz * v * up;
    }
    if (!need_stats) r.st(kZY) += zy;
  }

  const float* sc = SK == kScaleClass ? a.scale + a.col0 + lo : nullptr;
  const float s_seg = SK == kScaleSegment ? a.scale[g] : 1.0f;
  const float* tp = DENSE ? (SOFTMAX ? r.tz : r.trow) + lo : nullptr;
  FinalSums sums;
  if (a.coef == nullptr) {
    if constexpr (SOFTMAX) return;  // the softmax loss comes from the statistics alone
    sums = final_loop<SK, SOFTMAX, DENSE, false, false>(urow + lo, tp, sc, bp + lo, hi - lo, s_seg, inv_nt, inv_t,
                                                       t2, zscale, lse, escale, zmass, 0.f, s_n2, nullptr, nullptr);
  } else {
    double* ds = dscale_acc + lo;
    double* db = dbias_acc ? dbias_acc + lo : nullptr;
    // the gradient loop with or without the bias gradient, FROM_EXP given as a std::bool_constant
    const auto grad_loop = [&](auto from_exp_c) {
      constexpr bool kFromExp = decltype(from_exp_c)::value;
      return db ? final_loop<SK, SOFTMAX, DENSE, true, true, kFromExp>(urow + lo, tp, sc, bp + lo, hi - lo, s_seg,
                                                                       inv_nt, inv_t, t2, zscale, lse, escale,
                                                                       zmass, c, s_n2, ds, db)
                : final_loop<SK, SOFTMAX, DENSE, true, false, kFromExp>(urow + lo, tp, sc, bp + lo, hi - lo, s_seg,
                                                                        inv_nt, inv_t, t2, zscale, lse, escale,
                                                                        zmass, c, s_n2, ds, nullptr);
    };
    if constexpr (SOFTMAX && SK == kScaleNone) {
      sums = from_exp ? grad_loop(std::true_type{}) : grad_loop(std::false_type{});
    } else {
      sums = grad_loop(std::false_type{});
    }
  }
  if constexpr (!SOFTMAX) {
    a.softplus_sum[b] += sums.sp;
    if (DENSE && !need_stats) r.st(kZY) += sums.zy;
  }
  if (a.coef == nullptr) return;
  if constexpr (!DENSE) {
    for (int64_t t = r.t_begin; t < r.t_end; ++t) {
      urow[targets[t].col] += corr[t];
      // the bias gradient's correction is coef (dq/dz) v / T, which differs from the logit's under the scale
      if (dbias_acc) dbias_acc[targets[t].col] += bias_grad(c, dqz * targets[t].value, inv_t);
    }
  }
}

// One row of the chunk: the requested phases, piece by piece, while the row is in cache.
// ``urow`` is the row's fp32 scores: the buffer itself, or the fp32 copy of a bf16 row (see run). ``tz``: a row of
// ncols floats for the teacher exps (softmax with a dense teacher), else null.
template <int SK, bool SOFTMAX, bool DENSE>
void run_row(const SoftTargetChunk& a, int64_t b, float* urow, const std::vector<Target>& targets,
             const std::vector<int64_t>& piece_first, const float* bias, double* dscale_acc, double* dbias_acc,
             std::vector<float>& corr, float* tz) {
  const bool need_stats = SOFTMAX || SK != kScaleNone;
  // a whole segment in one call, softmax without a scale, gradient wanted: STATS leaves exp(y - m) for FINAL
  const bool store_exp = SOFTMAX && SK == kScaleNone && a.coef != nullptr && (a.phases & kPhaseStats) &&
                         (a.phases & kPhaseFinal);
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
                     tz};
    const bool teacher_ran = SOFTMAX && DENSE && (a.phases & kPhaseTeacher);
    const float tmax = teacher_ran ? teacher_phase(r) : 0.f;
    if (SK != kScaleNone && (a.phases & kPhaseNorm)) norm_phase(r);
    if (!(a.phases & (kPhaseStats | kPhaseFinal))) continue;

    const float inv_nt = static_cast<float>(inv_norm_t<double>(SK != kScaleNone, r.st(kSumSq), a.inv_t));
    float zscale = 0.f;
    if constexpr (SOFTMAX && DENSE)
      zscale = teacher_targets(r, teacher_ran, tmax, log_sum_exp<double>(r.st(kTeacherMax), r.st(kTeacherSumExp)));
    fold_bias<SK>(r);
    float m = 0.f;
    if (need_stats && (a.phases & kPhaseStats)) {
      if constexpr (SOFTMAX && SK == kScaleNone) {
        m = store_exp ? stats_phase<SK, SOFTMAX, DENSE, true>(r, targets, inv_nt, zscale)
                      : stats_phase<SK, SOFTMAX, DENSE>(r, targets, inv_nt, zscale);
      } else {
        m = stats_phase<SK, SOFTMAX, DENSE>(r, targets, inv_nt, zscale);
      }
    }
    if (a.phases & kPhaseFinal)
      final_phase<SK, SOFTMAX, DENSE>(r, targets, inv_nt, zscale, store_exp, m, dscale_acc, dbias_acc, corr);
  }
}

// Scores of type T (float, or bf16 as uint16_t). bf16 rows are widened into a per-thread fp32 row buffer, every phase
// runs on it exactly as on fp32 scores, and after a FINAL phase with coef the fp32 logit gradient is rounded back into
// the bf16 row (once: the sparse targets' corrections are added in fp32 before the rounding).
template <int SK, bool SOFTMAX, bool DENSE, class T>
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
    std::vector<double> dbias_acc(want_dbias ? ncols : 0, 0.0);  // per thread: rows are split across threads
    std::vector<Target> targets;
    std::vector<int64_t> piece_first(a.npieces + 1, 0);
    std::vector<float> corr;
    std::vector<float> row_f32(kWide && reads_u ? ncols : 0);
    std::vector<float> tz(SOFTMAX && DENSE ? ncols : 0);
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
      run_row<SK, SOFTMAX, DENSE>(a, b, urow, targets, piece_first, bias, dscale_acc.data(),
                                  want_dbias ? dbias_acc.data() : nullptr, corr, tz.data());
      if constexpr (kWide) {
        if (writes_u) float_row_to_bf16(row_f32.data(), scores, ncols);
      }
    }
    if (class_grad && a.dscale_class != nullptr) {  // null: the scale needs no gradient (accumulated all the same)
#pragma omp critical
      for (int64_t j = 0; j < ncols; ++j) a.dscale_class[j] += static_cast<float>(dscale_acc[j]);
    }
    if (want_dbias) {
#pragma omp critical
      for (int64_t j = 0; j < ncols; ++j) a.dbias[j] += static_cast<float>(dbias_acc[j]);
    }
  }
}

template <int SK, class T>
void dispatch_mode(const SoftTargetChunk& a) {
  const bool dense = a.teacher != nullptr;
  if (a.softmax) {
    dense ? run<SK, true, true, T>(a) : run<SK, true, false, T>(a);
  } else {
    dense ? run<SK, false, true, T>(a) : run<SK, false, false, T>(a);
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
