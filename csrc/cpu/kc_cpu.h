// CPU kernels of kc. Plain C++17 + OpenMP over raw float buffers: no torch headers, so the build is independent
// of the torch version. Every buffer is row-major and contiguous unless a leading dimension is given.
#pragma once
#include <cstdint>

namespace kc_cpu {

// out[r] = sum_c softplus(x[r, c]), computed stably as max(v, 0) + log1p(exp(-|v|)).
void row_softplus_sum(const float* x, float* out, int64_t rows, int64_t cols);

// out[r] = logsumexp_c x[r, c]; -inf for a row that is all -inf.
void row_logsumexp(const float* x, float* out, int64_t rows, int64_t cols);

}  // namespace kc_cpu
