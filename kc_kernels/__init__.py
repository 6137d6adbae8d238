"""kc_kernels: fused large-vocabulary soft-target losses and sampled softmax.

    import kc_kernels
    loss = kc_kernels.linear_soft_target_loss(x, weight, bias, target_index=idx, target_value=val)

Backends: reference (plain PyTorch), cpu (C++/OpenMP, chunked over classes), triton (GPU), cuda (CUDA C++),
portable (plain PyTorch chunked over classes, any device);
``kc_kernels.backends()`` tells which can run here and why not.
"""
from kc_kernels import reference
from kc_kernels.dispatch import backends, built_libraries
from kc_kernels.distributed import shard_classes, vocab_parallel_linear_soft_target_loss
from kc_kernels.host_buffers import release_host_buffers
from kc_kernels.logits import soft_target_logits
from kc_kernels.modules import LinearSoftTargetLoss, SampledSoftmaxLoss
from kc_kernels.ops import (
    linear_cross_entropy,
    linear_distillation_loss,
    linear_soft_target_loss,
    sampled_softmax_loss,
    soft_target_loss,
)
from kc_kernels.samplers import PhiloxGenerator

__version__ = "0.1.0"
__all__ = [
    "linear_soft_target_loss",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "soft_target_loss",
    "soft_target_logits",
    "sampled_softmax_loss",
    "PhiloxGenerator",
    "vocab_parallel_linear_soft_target_loss",
    "shard_classes",
    "LinearSoftTargetLoss",
    "SampledSoftmaxLoss",
    "backends",
    "built_libraries",
    "release_host_buffers",
    "reference",
]
