"""cuda backend of linear_soft_target_loss and soft_target_loss: the chunked driver (kc_kernels/chunked.py) with the
CUDA C++ epilogue kernels (csrc/cuda/soft_target.cu, launched through kc_kernels/cuda/epilogue.py).

Same walk as the triton backend (cuBLAS GEMMs through torch, the epilogue in place on the [rows, chunk] scores, no
atomics, bitwise-reproducible); only the two epilogue kernels differ. float64 and non-CUDA tensors are not taken.
"""
from __future__ import annotations

from kc_kernels.cuda import epilogue as _kernels
from kc_kernels.gpu_epilogue import entry_points

__all__ = ["linear_soft_target_loss", "soft_target_loss"]

linear_soft_target_loss, soft_target_loss = entry_points("cuda", _kernels, cuda_tensors_only=True)
