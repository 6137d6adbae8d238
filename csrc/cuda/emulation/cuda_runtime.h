// The CUDA runtime, as far as kc's kernels use it, for the host compiler: csrc/cuda/*.cu compiled for the CPU, so
// that their logic runs (tests/test_cuda_build.py) where there is no GPU. A launch runs the grid's blocks one after
// another and a block's threads as cooperative fibers (emulator.cpp), switched at __syncthreads and at each warp
// shuffle; __shared__ arrays are static (one block at a time). Fast-math intrinsics are their libm counterparts.
// Not modelled: concurrency between blocks, streams, the intrinsics' own rounding.
#pragma once
#include <math.h>
#include <stdint.h>

#include <functional>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef void* cudaStream_t;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t code) { return code ? "error (emulated CUDA)" : "no error"; }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}

namespace kc_emulation {
extern dim3 threadIdx, blockIdx, blockDim, gridDim;
void sync_block();
float shuffle_xor(float v, int lane_mask);
void launch(const std::function<void()>& thread_body, dim3 grid, dim3 block);
}  // namespace kc_emulation
using kc_emulation::blockDim;
using kc_emulation::blockIdx;
using kc_emulation::gridDim;
using kc_emulation::threadIdx;

inline void __syncthreads() { kc_emulation::sync_block(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) { return kc_emulation::shuffle_xor(v, lane_mask); }
inline float __expf(float x) { return expf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
