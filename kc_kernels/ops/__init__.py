"""Op fronts: argument checks, then dispatch to a backend."""
from kc_kernels.ops.cross_entropy import linear_cross_entropy
from kc_kernels.ops.distillation import linear_distillation_loss
from kc_kernels.ops.sampled_softmax import sampled_softmax_loss
from kc_kernels.ops.soft_target import linear_soft_target_loss, soft_target_loss

__all__ = ["linear_soft_target_loss", "soft_target_loss", "sampled_softmax_loss", "linear_cross_entropy",
           "linear_distillation_loss"]
