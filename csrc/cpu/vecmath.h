// Branch-free float exp / log1p that GCC and Clang vectorise inside `omp simd` loops.
// glibc's scalar expf/log1pf would not vectorise without -ffast-math, and the fused epilogue evaluates them on
// every one of the batch x classes logits, so they set the speed of the whole pass.
#pragma once
#include <cmath>
#include <cstdint>

namespace kc_cpu {

// exp(x) = 2^n * e^r with n = round(x / ln 2) and |r| <= ln2 / 2; a degree-6 Taylor polynomial is accurate to
// about 1.2e-7 relative there. Inputs are clamped to the normal float range: exp(-1e4) returns ~1e-38 rather than
// 0, which no sum of these terms can notice.
#define KC_VEC_INLINE inline __attribute__((always_inline))

static KC_VEC_INLINE float vexp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = std::fma(n, -0.693145751953125f, x);  // ln2 split in two parts keeps r exact
  r = std::fma(n, -1.428606765330187045e-06f, r);
  float p = 1.3888889e-3f;
  p = std::fma(p, r, 8.3333333e-3f);
  p = std::fma(p, r, 4.1666667e-2f);
  p = std::fma(p, r, 1.6666667e-1f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  // 2^n built in the exponent bits; a bit cast (not memcpy through an addressable local) keeps the loop vectorisable
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// 1/x for x in [a, b] without a division: the linear first guess of least relative error, c1 - c2 x with
// c2 = 2 / (ab + (a + b)^2 / 4) and c1 = c2 (a + b), then Newton steps r += r (1 - x r), each squaring the relative
// error. A division is one instruction, but its vector throughput is a fraction of the FMAs' (about 5 cycles per
// 8 lanes against 2 FMAs a cycle), and the sigmoid epilogue had two per logit.
// (No loop over the steps: an inner loop, even a constant one, can keep the caller's simd loop from vectorising.)
static KC_VEC_INLINE float newton_step(float x, float r) { return std::fma(r, std::fma(-x, r, 1.0f), r); }

template <int STEPS>
static KC_VEC_INLINE float vrcp_newton(float x, float c1, float c2) {
  static_assert(STEPS == 2 || STEPS == 3, "two or three Newton steps");
  float r = newton_step(x, newton_step(x, std::fma(-c2, x, c1)));
  if constexpr (STEPS == 3) r = newton_step(x, r);
  return r;
}

// 1/x on [1, 2]: first guess within 5.9%, three steps reach 1.4e-10 (then float rounding: at most 1 ulp).
static KC_VEC_INLINE float vinv_1_2(float x) { return vrcp_newton<3>(x, 1.41176471f, 0.47058824f); }

// log1p(t) for t in [0, 1] (the only range softplus needs): log(1 + t) = 2 atanh(t / (2 + t)). Above sqrt(2) - 1
// it uses log(1 + t) = ln 2 + log(1 + (t - 1) / 2), so the atanh argument stays below 0.172 and five odd terms
// reach float precision. No 1 + t is formed, so tiny t keeps full relative accuracy. 2 + w lies in [1.707, 2.415]:
// its reciprocal's first guess is within 1.5%, two Newton steps reach 5e-8.
static KC_VEC_INLINE float vlog1p_unit(float t) {
  const bool high = t > 0.41421356f;
  const float w = high ? (t - 1.0f) * 0.5f : t;
  const float s = w * vrcp_newton<2>(2.0f + w, 0.98506135f, 0.23901592f);
  const float s2 = s * s;
  float p = 1.0f / 11.0f;
  p = std::fma(p, s2, 1.0f / 9.0f);
  p = std::fma(p, s2, 1.0f / 7.0f);
  p = std::fma(p, s2, 1.0f / 5.0f);
  p = std::fma(p, s2, 1.0f / 3.0f);
  p = std::fma(p, s2, 1.0f);
  return 2.0f * s * p + (high ? 0.69314718055994531f : 0.0f);
}

// max(init, value(j) for j in [lo, hi)), where a value that is NaN is skipped. A running max per lane: GCC left an
// `omp simd reduction(max)` over std::max of plain loads scalar (vmaxss, 7x slower over a [1024, 8192] buffer),
// while this elementwise select over 16 lanes vectorises whatever value() is.
template <class F>
static KC_VEC_INLINE float lane_max(int64_t lo, int64_t hi, float init, F value) {
  constexpr int kLanes = 16;
  float lane[kLanes];
  for (int k = 0; k < kLanes; ++k) lane[k] = init;
  int64_t j = lo;
  for (; j + kLanes <= hi; j += kLanes) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) {
      const float v = value(j + k);
      lane[k] = lane[k] < v ? v : lane[k];
    }
  }
  float m = init;
  for (; j < hi; ++j) {
    const float v = value(j);
    m = m < v ? v : m;
  }
  for (int k = 0; k < kLanes; ++k) m = m < lane[k] ? lane[k] : m;
  return m;
}

// ---- bf16 storage (the upper 16 bits of an fp32), for bf16 scores buffers

// bf16 -> fp32 is exact: the 16 bits become the upper half of the float.
static KC_VEC_INLINE float bf16_to_float(uint16_t h) { return __builtin_bit_cast(float, static_cast<uint32_t>(h) << 16); }

// fp32 -> bf16 rounded to nearest, ties to even (as torch rounds); overflow rounds to +-inf. A NaN stays a (quiet)
// NaN: the rounding add could carry its mantissa into the sign bit or the exponent, so it is selected apart.
static KC_VEC_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t b = __builtin_bit_cast(uint32_t, f);
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? ((b >> 16) | 0x0040u) : rounded);
}

// Whole rows: leaf loops over restrict pointers, so that GCC vectorises them.
static inline void bf16_row_to_float(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = bf16_to_float(src[j]);
}

static inline void float_row_to_bf16(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = float_to_bf16(src[j]);
}

// The math policy of the shared epilogue formulas (csrc/common/soft_target_math.h) on the CPU.
struct VecMath {
  static KC_VEC_INLINE float exp(float x) { return vexp(x); }
  static KC_VEC_INLINE float log1p_unit(float t) { return vlog1p_unit(t); }
  static KC_VEC_INLINE float inv_1_2(float x) { return vinv_1_2(x); }
};

}  // namespace kc_cpu
