"""Triton backend of linear_soft_target_loss and soft_target_loss: the chunked driver (kc_kernels/chunked.py) with
the Triton epilogue kernels (kc_kernels/triton/epilogue.py).

The GEMMs are torch's (cuBLAS; fp32 inputs follow torch.get_float32_matmul_precision(), TF32 when "high"); the
epilogue reads the [rows, chunk] scores in the input dtype, computes in fp32 and writes the logit gradient back in
place. No atomics: the same inputs give bitwise-identical loss and gradients. float64 is not taken (the cpu and
reference backends are). CPU tensors are taken too: that is how the kernels run under TRITON_INTERPRET=1.
"""
from __future__ import annotations

from kc_kernels.gpu_epilogue import entry_points
from kc_kernels.triton import epilogue as _kernels

__all__ = ["linear_soft_target_loss", "soft_target_loss"]

linear_soft_target_loss, soft_target_loss = entry_points("triton", _kernels, cuda_tensors_only=False)
