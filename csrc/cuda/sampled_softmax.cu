// The elementwise part of sampled softmax on the gathered logits (the GEMMs around it are torch's).
//
// One block per row b reads its true logits [T] and sampled logits [S] (fp32; -inf where masked: padding labels,
// accidental hits), and gives
//   loss[b] = logsumexp(true, sampled) - sum_t target_t true_t,   target_t = 1 / num_true on each unmasked true
// and, with coef, overwrites both in place by coef[b] (softmax - target): the gradient of coef[b] loss[b] with
// respect to the logits, ready for the gradient GEMMs. Fixed-order block reductions, no atomics: same bits every
// run.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/soft_target_math.h"
#include "cuda/device_utils.cuh"
#include "cuda/kc_cuda.h"

namespace kc_cuda {
namespace {

using kc::CudaMath;

constexpr int kMaxThreads = 256;

// The row's logits as one sequence: the true ones first, then the sampled ones.
struct RowLogits {
  float* true_logits;
  int64_t num_true;
  float* sampled;
  int64_t num_sampled;

  __device__ __forceinline__ int64_t size() const { return num_true + num_sampled; }
  __device__ __forceinline__ float& operator[](int64_t i) const {
    return i < num_true ? true_logits[i] : sampled[i - num_true];
  }
};

__global__ void __launch_bounds__(kMaxThreads) sampled_softmax_kernel(const SampledSoftmaxParams p) {
  __shared__ float scratch[32 * 2];
  const int64_t row = blockIdx.x;
  const RowLogits v{static_cast<float*>(p.true_logits) + row * p.true_row_stride, p.num_true,
                    static_cast<float*>(p.sampled_logits) + row * p.sampled_row_stride, p.num_sampled};

  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < v.size(); i += blockDim.x) m = fmaxf(m, v[i]);
  m = block_max(m, scratch);
  // nothing unmasked: every exp below is 0 rather than exp(-inf - -inf)
  const float shift = m == -INFINITY ? 0.f : m;

  enum { kSumExp, kNumTrue, kTrueSum };
  float acc[3] = {};
  for (int64_t i = threadIdx.x; i < v.size(); i += blockDim.x) {
    const float logit = v[i];
    acc[kSumExp] += CudaMath::exp(logit - shift);
    if (i < v.num_true && logit != -INFINITY) {
      acc[kNumTrue] += 1.f;
      acc[kTrueSum] += logit;
    }
  }
  block_sum(acc, scratch);
  const float lse = kc::log_sum_exp(shift, acc[kSumExp]);  // -inf when nothing is unmasked
  const float target = acc[kNumTrue] > 0.f ? 1.f / acc[kNumTrue] : 0.f;
  if (p.loss != nullptr && threadIdx.x == 0) static_cast<float*>(p.loss)[row] = lse - target * acc[kTrueSum];
  if (p.coef == nullptr) return;

  const float c = static_cast<const float*>(p.coef)[row];
  for (int64_t i = threadIdx.x; i < v.size(); i += blockDim.x) {
    float& logit = v[i];
    const float prob = logit == -INFINITY ? 0.f : CudaMath::exp(logit - lse);
    const float z = i < v.num_true && logit != -INFINITY ? target : 0.f;
    logit = c * (prob - z);
  }
}

// Threads of a block: about four logits each, 32 to 256.
int threads_for(int64_t per_row) {
  int threads = 32;
  while (threads < kMaxThreads && 4 * threads < per_row) threads *= 2;
  return threads;
}

}  // namespace

int sampled_softmax(const SampledSoftmaxParams& p) {
  if (p.rows == 0) return 0;
  if (p.rows > 2147483647) return static_cast<int>(cudaErrorInvalidConfiguration);
  const unsigned blocks = static_cast<unsigned>(p.rows);
  const int threads = threads_for(p.num_true + p.num_sampled);
  auto stream = static_cast<cudaStream_t>(p.stream);
  sampled_softmax_kernel<<<blocks, threads, 0, stream>>>(p);
  return launch_status();
}

}  // namespace kc_cuda
