// Launchers of kc's CUDA kernels. This header is included by the host-compiled pybind11 bindings, so it uses no
// CUDA or torch types: pointers are raw, the stream is a cudaStream_t passed as void*, and every launcher returns
// a cudaError_t as int (0 = success) that the bindings turn into a Python exception.
#pragma once
#include <cstdint>

namespace kc_cuda {

// out[r] = logsumexp_c x[r, c] over a contiguous fp32 [rows, cols] buffer; one block per row.
int row_logsumexp(const float* x, float* out, int64_t rows, int64_t cols, void* stream);

// out[r] = sum_c softplus(x[r, c]).
int row_softplus_sum(const float* x, float* out, int64_t rows, int64_t cols, void* stream);

// Name of a cudaError_t value.
const char* error_string(int code);

// Number of visible CUDA devices, or a negative cudaError_t when the runtime cannot be initialised.
int device_count();

}  // namespace kc_cuda
