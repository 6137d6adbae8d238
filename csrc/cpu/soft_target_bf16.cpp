// The fused epilogue over bf16 scores (the output of a bf16 logits GEMM): rows widened to fp32, fp32 math, the logit
// gradient rounded back to bf16 (see run in soft_target_impl.h). A translation unit of its own, so that these
// instances leave the fp32 ones of soft_target.cpp as they were.
#include <cstdint>

#include "cpu/kc_cpu.h"
#include "cpu/soft_target_impl.h"

namespace kc_cpu {

void soft_target_chunk_bf16(const SoftTargetChunk& a) { soft_target_chunk_as<uint16_t>(a); }

}  // namespace kc_cpu
