// Row passes of the CPU sampled softmax over its [B, S + padding] buffer of sampled logits (the GEMMs and the
// per-row true logits are torch's: kc_kernels/cpu/sampled_softmax.py). Each pass is one OpenMP sweep over the rows
// in place of the four to six torch passes (shift add, max, subtract, exp, sum; scale, column sum) it replaces,
// each of which read and wrote the whole buffer.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/kc_cpu.h"
#include "cpu/vecmath.h"

namespace kc_cpu {

void sampled_rows_exp(const SampledRowsExp& a) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < a.rows; ++b) {
    float* __restrict u = a.u + b * a.ld;
    const float* __restrict shift = a.shift;
    if (shift != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < a.cols; ++j) u[j] += shift[j];
    }
    const float m = lane_max(0, a.cols, a.extra_max[b], [u](int64_t j) { return u[j]; });
    float s = 0.f;
    // a masked logit (-inf: an accidental hit) has probability exactly 0, not the polynomial's clamped exp(-87)
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < a.cols; ++j) {
      const float e = u[j] == neg_inf ? 0.0f : vexp(u[j] - m);
      u[j] = e;
      s += e;
    }
    for (int64_t j = a.cols; j < a.cols + a.pad_cols; ++j) u[j] = 0.0f;
    a.out_max[b] = m;
    a.out_sum[b] = s;
  }
}

void sampled_rows_scale(const SampledRowsScale& a) {
#pragma omp parallel
  {
    std::vector<double> colsum(a.colsum != nullptr ? a.cols : 0, 0.0);  // per thread: rows are split across threads
#pragma omp for schedule(static)
    for (int64_t b = 0; b < a.rows; ++b) {
      float* __restrict u = a.u + b * a.ld;
      const float c = a.row_scale[b];
      if (a.colsum != nullptr) {
        double* __restrict cs = colsum.data();
#pragma omp simd
        for (int64_t j = 0; j < a.cols; ++j) {
          u[j] *= c;
          cs[j] += u[j];
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < a.cols; ++j) u[j] *= c;
      }
    }
    if (a.colsum != nullptr) {
#pragma omp critical
      for (int64_t j = 0; j < a.cols; ++j) a.colsum[j] += static_cast<float>(colsum[j]);
    }
  }
}

}  // namespace kc_cpu
