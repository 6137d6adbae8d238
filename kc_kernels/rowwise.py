"""Row-wise reductions over fp32 [rows, cols] tensors by the compiled kernels (csrc/cpu and csrc/cuda).

They are small on purpose: they prove that build, binding and loading work end to end on each side, and serve as
building blocks (e.g. logsumexp of a chunk of logits).
"""
from __future__ import annotations

import torch


def _prepare(x: torch.Tensor, name: str):
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(x.shape)}")
    x = x.to(torch.float32).contiguous()
    return x, torch.empty(x.shape[0], dtype=torch.float32, device=x.device)


def _run(kernel: str, x: torch.Tensor) -> torch.Tensor:
    x, out = _prepare(x, "x")
    rows, cols = x.shape
    if x.device.type == "cuda":
        from kc_kernels import _cuda

        getattr(_cuda, kernel)(x.data_ptr(), out.data_ptr(), rows, cols, torch.cuda.current_stream(x.device).cuda_stream)
    else:
        from kc_kernels import _C

        getattr(_C, kernel)(x.data_ptr(), out.data_ptr(), rows, cols)
    return out


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over each row, fp32 [rows]."""
    return _run("row_logsumexp", x)


def row_softplus_sum(x: torch.Tensor) -> torch.Tensor:
    """sum_c softplus(x[r, c]) for each row, fp32 [rows]."""
    return _run("row_softplus_sum", x)
