"""torch.autocast for the op fronts: the inputs of the output layer are cast as nn.Linear's would be, and the op
then runs with autocast off, so its statistics and its loss stay fp32 (the backends choose their own precision)."""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Optional, Tuple

import torch


def _enabled(device_type: str) -> bool:
    if device_type not in ("cpu", "cuda"):
        return False  # no autocast for other devices (meta, ...): asking would raise
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _dtype(device_type: str) -> torch.dtype:
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def cast_inputs(device_type: str, *tensors: Optional[torch.Tensor]) -> Tuple[Any, ...]:
    """Under autocast, every floating tensor but float64 in the autocast dtype (nn.Linear's policy); otherwise the
    tensors as given."""
    if not _enabled(device_type):
        return tensors
    dtype = _dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def disabled(device_type: str) -> ContextManager:
    """Autocast off while the op runs (a no-op context when it is off already)."""
    if not _enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
