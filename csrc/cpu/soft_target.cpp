// Fused epilogue of the chunked linear + soft-target loss over fp32 scores, and the entry point that picks the
// instance of the scores type (the implementation: soft_target_impl.h; bf16 scores: soft_target_bf16.cpp).
#include "cpu/kc_cpu.h"
#include "cpu/soft_target_impl.h"

namespace kc_cpu {

void soft_target_chunk(const SoftTargetChunk& a) {
  if (a.scores_dtype == kScoresBF16) {
    soft_target_chunk_bf16(a);
  } else {
    soft_target_chunk_as<float>(a);
  }
}

bool native_bf16() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
#if !defined(__clang__) && __GNUC__ >= 12
  if (__builtin_cpu_supports("amx-bf16")) return true;
#endif
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

}  // namespace kc_cpu
