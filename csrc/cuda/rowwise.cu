#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>

#include "cuda/kc_cuda.h"

namespace kc_cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float softplus(float v) { return fmaxf(v, 0.f) + log1pf(__expf(-fabsf(v))); }

// Online (max, sum-exp) pair: merging two partial states is associative, so one pass over the row suffices.
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity) {
  __shared__ T warp_vals[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) {
    T other;
    if constexpr (sizeof(T) == sizeof(float)) {
      other = __shfl_down_sync(0xffffffffu, v, off);
    } else {
      other.m = __shfl_down_sync(0xffffffffu, v.m, off);
      other.s = __shfl_down_sync(0xffffffffu, v.s, off);
    }
    v = op(v, other);
  }
  if (lane == 0) warp_vals[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_vals[threadIdx.x] : identity;
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) {
      T other;
      if constexpr (sizeof(T) == sizeof(float)) {
        other = __shfl_down_sync(0xffffffffu, v, off);
      } else {
        other.m = __shfl_down_sync(0xffffffffu, v.m, off);
        other.s = __shfl_down_sync(0xffffffffu, v.s, off);
      }
      v = op(v, other);
    }
  }
  return v;
}

__global__ void row_logsumexp_kernel(const float* __restrict__ x, float* __restrict__ out, int64_t cols) {
  const float* row = x + static_cast<int64_t>(blockIdx.x) * cols;
  MaxSum st{-INFINITY, 0.f};
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) st = merge(st, MaxSum{row[c], 1.f});
  st = block_reduce(st, merge, MaxSum{-INFINITY, 0.f});
  if (threadIdx.x == 0) out[blockIdx.x] = st.m == -INFINITY ? -INFINITY : st.m + logf(st.s);
}

__global__ void row_softplus_sum_kernel(const float* __restrict__ x, float* __restrict__ out, int64_t cols) {
  const float* row = x + static_cast<int64_t>(blockIdx.x) * cols;
  float acc = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) acc += softplus(row[c]);
  acc = block_reduce(acc, [](float a, float b) { return a + b; }, 0.f);
  if (threadIdx.x == 0) out[blockIdx.x] = acc;
}

}  // namespace

int row_logsumexp(const float* x, float* out, int64_t rows, int64_t cols, void* stream) {
  if (rows == 0) return 0;
  row_logsumexp_kernel<<<static_cast<unsigned>(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, out, cols);
  return static_cast<int>(cudaGetLastError());
}

int row_softplus_sum(const float* x, float* out, int64_t rows, int64_t cols, void* stream) {
  if (rows == 0) return 0;
  row_softplus_sum_kernel<<<static_cast<unsigned>(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, out,
                                                                                                            cols);
  return static_cast<int>(cudaGetLastError());
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  return err == cudaSuccess ? n : -static_cast<int>(err);
}

}  // namespace kc_cuda
