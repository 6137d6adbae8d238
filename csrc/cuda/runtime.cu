// Queries of the CUDA runtime that the Python side uses to tell whether the cuda backend can run here.
#include <cuda_runtime.h>

#include "cuda/kc_cuda.h"

namespace kc_cuda {

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  return err == cudaSuccess ? n : -static_cast<int>(err);
}

}  // namespace kc_cuda
