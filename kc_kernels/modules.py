"""nn.Module wrappers of the functional ops. They hold the loss's configuration; the layers' parameters stay with
the model that owns them, so the same weight can serve inference (x @ weight.T) and the fused loss."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kc_kernels.ops import linear_soft_target_loss, sampled_softmax_loss


class LinearSoftTargetLoss(nn.Module):
    """``loss = LinearSoftTargetLoss(mode="sigmoid", segments=...)(x, weight, bias, target_index=..., ...)``."""

    def __init__(self, mode: str = "sigmoid", segments=None, temperature: float = 1.0, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        self.mode, self.temperature, self.reduction, self.backend = mode, temperature, reduction, backend
        self.segments = None if segments is None else torch.as_tensor(segments, dtype=torch.long)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                target_index=None, target_value=None, teacher_logits=None, scale=None,
                sample_weight=None) -> torch.Tensor:
        segments = None if self.segments is None else self.segments.to(x.device)
        return linear_soft_target_loss(x, weight, bias, target_index=target_index, target_value=target_value,
                                       teacher_logits=teacher_logits, mode=self.mode, segments=segments,
                                       scale=scale, temperature=self.temperature, sample_weight=sample_weight,
                                       reduction=self.reduction, backend=self.backend)

    def extra_repr(self):
        g = 1 if self.segments is None else len(self.segments) - 1
        return f"mode={self.mode}, segments={g}, temperature={self.temperature}, reduction={self.reduction}"


class SampledSoftmaxLoss(nn.Module):
    """Sampled softmax with its own seeded generator: ``SampledSoftmaxLoss(8192, seed=0)(x, weight, bias, labels)``."""

    def __init__(self, num_sampled: int, sampler: str = "log_uniform", class_counts: Optional[torch.Tensor] = None,
                 distortion: float = 1.0, unique: bool = True, remove_accidental_hits: bool = True,
                 subtract_log_q: bool = True, reduction: str = "mean", seed: Optional[int] = None,
                 sparse_grad: bool = False, backend: str = "auto"):
        super().__init__()
        self.num_sampled, self.sampler, self.distortion, self.unique = num_sampled, sampler, distortion, unique
        self.remove_accidental_hits, self.subtract_log_q = remove_accidental_hits, subtract_log_q
        self.reduction, self.backend, self.sparse_grad = reduction, backend, sparse_grad
        self.class_counts = class_counts
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def forward(self, x, weight, bias, labels, *, sample_weight=None):
        return sampled_softmax_loss(x, weight, bias, labels, num_sampled=self.num_sampled, sampler=self.sampler,
                                    class_counts=self.class_counts, distortion=self.distortion, unique=self.unique,
                                    remove_accidental_hits=self.remove_accidental_hits,
                                    subtract_log_q=self.subtract_log_q, generator=self.generator,
                                    sample_weight=sample_weight, reduction=self.reduction,
                                    sparse_grad=self.sparse_grad, backend=self.backend)

    def extra_repr(self):
        return f"num_sampled={self.num_sampled}, sampler={self.sampler}, unique={self.unique}"
