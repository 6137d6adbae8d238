// Device helpers shared by kc's CUDA kernels: element loads and stores in any of the buffer dtypes (math is fp32),
// deterministic warp and block reductions, and the dispatch of a runtime dtype to a template instance.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kc_cuda.h"

namespace kc_cuda {

constexpr unsigned kFullWarp = 0xffffffffu;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Butterfly sums over the warp: at every step lanes L and L^off add the same two numbers (in either order, which
// IEEE addition does not see), so every lane ends with the same bits, run after run.
template <int N>
__device__ __forceinline__ void warp_sum(float (&v)[N]) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(kFullWarp, v[i], off);
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullWarp, v, off));
  return v;
}

// Block-wide sums of N values; every thread receives the totals. The warps' partials are added in warp order, so
// the result does not depend on scheduling. `scratch` holds 32 * N floats; the closing barrier lets the caller
// reuse it at once. blockDim.x must be a multiple of 32 and every thread of the block must call this.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float* scratch) {
  warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) scratch[warp * N + i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += scratch[w * N + i];
    v[i] = s;
  }
  __syncthreads();
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float m = -INFINITY;
  for (int w = 0; w < warps; ++w) m = fmaxf(m, scratch[w]);
  __syncthreads();
  return m;
}

__host__ __device__ __forceinline__ int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

// First position in sorted[lo, hi) whose value is >= key (hi if none).
__device__ __forceinline__ int64_t lower_bound(const int32_t* sorted, int64_t lo, int64_t hi, int64_t key) {
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (sorted[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// A runtime DType as a C++ type: dispatch_*(dtype, f) calls f(TypeTag<T>{}) and returns its cudaError_t, or
// cudaErrorInvalidValue for a dtype the buffer may not have.
template <class T>
struct TypeTag {
  using type = T;
};

template <class F>
int dispatch_work_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32:
      return f(TypeTag<float>{});
    case kFloat16:
      return f(TypeTag<__half>{});
    case kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

template <class F>
int dispatch_any_float_dtype(int dtype, F&& f) {
  if (dtype == kFloat64) return f(TypeTag<double>{});
  return dispatch_work_dtype(dtype, f);
}

// The error of the kernel launch just made (e.g. a bad configuration), as the launchers return it.
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace kc_cuda
