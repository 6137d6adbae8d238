"""Large host tensors with fewer page faults: 2 MiB pages where the kernel allows them, and zeros nobody writes.

torch's CPU allocator maps a large tensor in 4 KiB pages and ``torch.zeros`` writes every byte: the first touch
of a fresh [V, H] weight gradient (200 MB at V=100K, H=512) is 50K page faults, about 40 ms on a 2-core Xeon, 4% of
the whole fused op. NumPy asks for transparent huge pages on large arrays (``madvise(MADV_HUGEPAGE)``; the same
first touch took 17 ms), and its zeros come from ``calloc``, whose fresh pages the kernel has already zeroed: a
dense gradient of which only the sampled rows are written (sampled softmax) never writes the rest (42 -> 15 ms
for 8,192 of 100K rows). The first huge-page allocation of a process may wait for the kernel to compact memory
(0.3 s measured, once).

The tensors are ordinary CPU tensors viewing NumPy-owned memory (kept alive by the tensor), except that their
storage cannot be resized in place. Small requests and other devices go to torch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

MIN_BYTES = 4 << 20  # below this torch's allocator (and its cache of small blocks) is as fast


def _numpy_backed(shape: Sequence[int], dtype: torch.dtype, zero: bool) -> torch.Tensor:
    numel = 1
    for n in shape:
        numel *= int(n)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = (np.zeros if zero else np.empty)(numel * itemsize, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).view(tuple(int(n) for n in shape))


def _large(shape: Sequence[int], dtype: torch.dtype, device) -> bool:
    if torch.device(device).type != "cpu" or dtype.is_complex:
        return False
    numel = 1
    for n in shape:
        numel *= int(n)
    return numel * torch.empty((), dtype=dtype).element_size() >= MIN_BYTES


def empty(shape: Sequence[int], dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """torch.empty(shape, dtype=dtype, device=device), in huge pages when large and on the host."""
    if _large(shape, dtype, device):
        return _numpy_backed(shape, dtype, zero=False)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def zeros(shape: Sequence[int], dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """torch.zeros(shape, dtype=dtype, device=device); on the host and large, pages never written stay the
    kernel's zero pages."""
    if _large(shape, dtype, device):
        return _numpy_backed(shape, dtype, zero=True)
    return torch.zeros(tuple(shape), dtype=dtype, device=device)


def zeros_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous zero tensor of t's shape, dtype and device (see zeros)."""
    return zeros(t.shape, t.dtype, t.device)
