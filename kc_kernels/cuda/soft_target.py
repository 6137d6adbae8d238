"""cuda backend of linear_soft_target_loss and soft_target_loss: the chunked driver (kc_kernels/chunked.py) with the
CUDA C++ epilogue kernels (csrc/cuda/soft_target.cu, launched through kc_kernels/cuda/epilogue.py).

Same walk as the triton backend (cuBLAS GEMMs through torch, the epilogue in place on the [rows, chunk] scores, no
atomics, bitwise-reproducible); only the two epilogue kernels differ. float64 is not taken.
"""
from __future__ import annotations

import torch

from kc_kernels import chunked
from kc_kernels.cuda import epilogue as _kernels
from kc_kernels.gpu_epilogue import DeviceEpilogue
from kc_kernels.ops.soft_target import SoftTargetProblem

__all__ = ["linear_soft_target_loss", "soft_target_loss"]

DEFAULT_MEMORY_BUDGET = 512 << 20  # bytes of the [B, chunk] scores buffer and the partial sums on a GPU
EPILOGUE = DeviceEpilogue(_kernels)
chunked.register_epilogue("cuda", EPILOGUE)


def _check(name: str, t: torch.Tensor):
    if t.dtype == torch.float64:
        raise ValueError(f"{name}: the cuda backend takes float32, float16 or bfloat16, not float64 "
                         "(use backend='cpu' or 'reference' for float64)")
    if t.device.type != "cuda":
        raise ValueError(f"{name}: the cuda backend takes CUDA tensors, got a tensor on {t.device}")


def linear_soft_target_loss(p: SoftTargetProblem) -> torch.Tensor:
    _check("x", p.x)
    return chunked.linear_soft_target_loss(p, "cuda", p.memory_budget or DEFAULT_MEMORY_BUDGET)


def soft_target_loss(p: SoftTargetProblem) -> torch.Tensor:
    _check("logits", p.logits)
    return chunked.soft_target_loss(p, "cuda", p.memory_budget or DEFAULT_MEMORY_BUDGET)


# what `auto` may send here (float64 goes to another backend)
linear_soft_target_loss.dtypes = soft_target_loss.dtypes = (torch.float32, torch.float16, torch.bfloat16)
