#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/kc_cpu.h"

namespace kc_cpu {

void row_softplus_sum(const float* x, float* out, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * cols;
    double acc = 0.0;  // a 100K-term sum: accumulate in double, the loads stay vectorised
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < cols; ++c) {
      const float v = row[c];
      acc += std::max(v, 0.0f) + std::log1p(std::exp(-std::fabs(v)));
    }
    out[r] = static_cast<float>(acc);
  }
}

void row_logsumexp(const float* x, float* out, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * cols;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < cols; ++c) m = std::max(m, row[c]);
    if (!std::isfinite(m)) {
      out[r] = m;  // all -inf gives -inf; a +inf or NaN propagates
      continue;
    }
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < cols; ++c) s += std::exp(row[c] - m);
    out[r] = m + static_cast<float>(std::log(s));
  }
}

}  // namespace kc_cpu
