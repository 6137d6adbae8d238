"""The rules every op and backend shares for precision and for turning per-row losses into the op's result."""
from __future__ import annotations

from typing import Optional

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of statistics, losses and accumulators: fp64 stays fp64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_loss(per_row: torch.Tensor, sample_weight: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    """``w_b * l_b`` per row ("none"), their sum ("sum") or the sum over B ("mean"; 0 for an empty batch)."""
    if sample_weight is not None:
        per_row = per_row * sample_weight.to(per_row.dtype)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / max(per_row.shape[0], 1)  # an empty batch: loss 0 and zero gradients, not 0/0


def row_weights(sample_weight: Optional[torch.Tensor], batch: int, reduction: str, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """d(reduced loss) / d(per-row loss) [batch]: the sample weight (a constant), over B for "mean"."""
    if sample_weight is not None:
        w = sample_weight.detach().to(dtype)
    else:
        w = torch.ones(batch, dtype=dtype, device=device)
    return w / batch if reduction == "mean" else w
