"""Triton backend of linear_soft_target_loss and soft_target_loss: the chunked driver (kc_kernels/chunked.py) with
the Triton epilogue kernels (kc_kernels/triton/epilogue.py).

The GEMMs are torch's (cuBLAS; fp32 inputs follow torch.get_float32_matmul_precision(), TF32 when "high"); the
epilogue reads the [rows, chunk] scores in the input dtype, computes in fp32 and writes the logit gradient back in
place. No atomics: the same inputs give bitwise-identical loss and gradients. float64 is not taken (the cpu and
reference backends are).
"""
from __future__ import annotations

import torch

from kc_kernels import chunked
from kc_kernels.gpu_epilogue import DeviceEpilogue
from kc_kernels.ops.soft_target import SoftTargetProblem
from kc_kernels.triton import epilogue as _kernels

__all__ = ["linear_soft_target_loss", "soft_target_loss"]

DEFAULT_MEMORY_BUDGET = 512 << 20  # bytes of the [B, chunk] scores buffer and the partial sums on a GPU
EPILOGUE = DeviceEpilogue(_kernels)
chunked.register_epilogue("triton", EPILOGUE)


def _check_dtype(name: str, t: torch.Tensor):
    if t.dtype == torch.float64:
        raise ValueError(f"{name}: the triton backend takes float32, float16 or bfloat16, not float64 "
                         "(use backend='cpu' or 'reference' for float64)")


def linear_soft_target_loss(p: SoftTargetProblem) -> torch.Tensor:
    _check_dtype("x", p.x)
    return chunked.linear_soft_target_loss(p, "triton", p.memory_budget or DEFAULT_MEMORY_BUDGET)


def soft_target_loss(p: SoftTargetProblem) -> torch.Tensor:
    _check_dtype("logits", p.logits)
    return chunked.soft_target_loss(p, "triton", p.memory_budget or DEFAULT_MEMORY_BUDGET)


# what `auto` may send here (float64 goes to another backend)
linear_soft_target_loss.dtypes = soft_target_loss.dtypes = (torch.float32, torch.float16, torch.bfloat16)
