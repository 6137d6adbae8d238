"""Argument checks shared by the op fronts. Every failure is a ValueError whose message starts with the argument."""
from __future__ import annotations

import math
import os
from typing import Dict, List, NoReturn, Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


def fail(name: str, msg: str) -> NoReturn:
    raise ValueError(f"{name}: {msg}")


def tensor(name: str, t: object, *, dims: Optional[Sequence[int]] = None, floating: bool = False,
           integer: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        fail(name, f"expected a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        fail(name, f"expected {' or '.join(f'{d}-D' for d in dims)}, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        fail(name, f"expected a float32, float16, bfloat16 or float64 tensor, got {t.dtype}")
    if integer and t.dtype not in INT_DTYPES:
        fail(name, f"expected an integer tensor, got {t.dtype}")
    return t


def same_device(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        fail(name, f"on {t.device} but {ref_name} is on {ref.device}")


def shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        fail(name, f"expected shape {tuple(expected)} ({what}), got {tuple(t.shape)}")


def finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        fail(name, "contains NaN or infinite values")


def index_range(name: str, t: torch.Tensor, num_classes: int, allow_padding: bool = True) -> None:
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    low_ok = -1 if allow_padding else 0
    if lo < low_ok:
        padding = "-1 is padding" if allow_padding else "no padding"
        fail(name, f"values must be in [{low_ok}, {num_classes}) ({padding}), "
                   f"found {lo}")
    if hi >= num_classes:
        fail(name, f"values must be < the number of classes {num_classes}, found {hi}")


def linear_weights(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                   need_classes: bool = True) -> int:
    """The output layer of a fused linear op: weight [V, H] and bias [V] beside x [..., H] (same device and dtype);
    returns V. ``need_classes``: V = 0 is refused."""
    tensor("weight", weight, dims=(2,), floating=True)
    same_device("weight", weight, x, "x")
    if weight.dtype != x.dtype:
        fail("weight", f"dtype {weight.dtype} differs from x's {x.dtype}")
    if weight.shape[1] != x.shape[-1]:
        fail("weight", f"has {weight.shape[1]} input features but x has {x.shape[-1]}")
    V = weight.shape[0]
    if need_classes and V == 0:
        fail("weight", "has no classes (0 rows)")
    if bias is not None:
        tensor("bias", bias, dims=(1,), floating=True)
        same_device("bias", bias, x, "x")
        shape("bias", bias, (V,), "one per class")
        if bias.dtype != x.dtype:
            fail("bias", f"dtype {bias.dtype} differs from x's {x.dtype}")
    return V


def positive_number(name: str, v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        fail(name, f"expected a number, got {v!r}")
    if not math.isfinite(f) or f <= 0:
        fail(name, f"must be a finite number > 0, got {v!r}")
    return f


def choice(name: str, v, options: Sequence[str]) -> str:
    if v not in options:
        fail(name, f"must be one of {tuple(options)}, got {v!r}")
    return v


VALUES_ENV = "KC_CHECK_VALUES"


def values_mode(device) -> str:
    """How the checks that read tensor values (NaN, index range, negative targets) run: "sync", "async" or "off".

    "sync" reads the data on the host and raises ValueError naming the argument; on a GPU that is a
    synchronisation per check, so by default it is the mode of CPU tensors only and GPU tensors get "off".
    KC_CHECK_VALUES=1 makes every device "sync", KC_CHECK_VALUES=0 every device "off", and KC_CHECK_VALUES=async
    every device "async": each check is a device-side assertion (``torch._assert_async``) queued with the op's own
    work, which costs a few reductions and no host synchronisation; a failure is reported at the next point where
    the host waits for the device anyway (loss.item(), an optimizer step that reads a value, a copy to the host)
    as a RuntimeError whose message starts with the argument. (On a CUDA device a failed device-side assertion
    also ends the process's CUDA context, as every CUDA assertion does.) On CPU tensors "async" raises at once.
    Checks are always off while torch.compile traces (a data-dependent branch would break the graph). Invalid
    indices are never read or written by any backend, checked or not: they are ignored."""
    if torch.compiler.is_compiling():
        return "off"
    if torch.device(device).type == "meta":
        return "off"  # meta tensors hold no values to read
    flag = os.environ.get(VALUES_ENV, "").strip().lower()
    if flag == "async":
        return "async"
    if flag in ("0", "1"):
        return "sync" if flag == "1" else "off"
    if flag:
        fail(VALUES_ENV, f"must be 0, 1 or async, got {flag!r}")
    return "sync" if torch.device(device).type == "cpu" else "off"


def values_enabled(device) -> bool:
    """Whether the value checks read the data on the host (``values_mode(device) == "sync"``)."""
    return values_mode(device) == "sync"


def assert_later(name: str, ok: torch.Tensor, msg: str) -> None:
    """An "async" value check: ``ok`` (a bool tensor computed on the data's device) must hold; no host sync."""
    torch._assert_async(ok, f"{name}: {msg}")


def index_range_later(name: str, t: torch.Tensor, num_classes: int, allow_padding: bool = True) -> None:
    low = -1 if allow_padding else 0
    assert_later(name, ((t >= low) & (t < num_classes)).all(),
                 f"values must be in [{low}, {num_classes}) (a device-side check failed)")


# offsets of segment tensors that live on a GPU, by (address, version, length, device): reading them is a
# synchronisation, so it happens once per tensor rather than once per call
_DEVICE_SEGMENTS: Dict[Tuple, Tuple[List[int], torch.Tensor]] = {}


def _device_segments(segs: torch.Tensor) -> Tuple[List[int], torch.Tensor]:
    key = (segs.data_ptr(), segs._version, segs.numel(), segs.dtype, str(segs.device))
    hit = _DEVICE_SEGMENTS.get(key)
    if hit is None:
        if len(_DEVICE_SEGMENTS) > 64:
            _DEVICE_SEGMENTS.clear()
        hit = (segs.tolist(), segs.long())
        _DEVICE_SEGMENTS[key] = hit
    return hit


def segments(segs, num_classes: int, device) -> Optional[torch.Tensor]:
    """Validated segment offsets as an int64 tensor on ``device`` (None stays None)."""
    return segment_layout(segs, num_classes, device)[1]


def segment_layout(segs, num_classes: int, device, defer: bool = False
                   ) -> Tuple[Optional[List[int]], Optional[torch.Tensor]]:
    """(offsets as a host list, int64 tensor on ``device``) of validated segments; (None, None) for None.
    ``defer``: a tensor's values are not read while torch.compile traces (reading them would break the graph):
    (None, the int64 tensor) is returned, and the op that takes the tensor reads and checks the offsets when it
    runs (``bounds_of``)."""
    if segs is None:
        return None, None
    cached = None
    if isinstance(segs, torch.Tensor):
        if segs.dtype not in INT_DTYPES:
            fail("segments", f"expected an integer tensor, got {segs.dtype}")
        if segs.dim() != 1:
            fail("segments", f"expected a 1-D tensor of class offsets, got shape {tuple(segs.shape)}")
        if defer and torch.compiler.is_compiling():
            if segs.shape[0] < 2:
                fail("segments", f"needs at least two offsets [0, ..., V], got {segs.shape[0]}")
            return None, segs.to(device=device, dtype=torch.long)
        if segs.device.type != "cpu" and segs.device == torch.device(device):
            bounds, cached = _device_segments(segs)
        else:
            bounds = segs.tolist()
    else:
        try:
            bounds = [int(b) for b in segs]
        except (TypeError, ValueError):
            fail("segments", "expected a 1-D sequence of integer class offsets")
    if len(bounds) < 2:
        fail("segments", f"needs at least two offsets [0, ..., V], got {bounds}")
    if bounds[0] != 0:
        fail("segments", f"must start at 0, starts at {bounds[0]}")
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        fail("segments", "offsets must be strictly increasing")
    if bounds[-1] != num_classes:
        fail("segments", f"must end at the number of classes {num_classes}, ends at {bounds[-1]}")
    if cached is not None:
        return bounds, cached
    return bounds, _host_segments(tuple(bounds), str(device))


def bounds_of(segs: torch.Tensor, num_classes: int) -> List[int]:
    """The checked host offsets of a segments tensor whose values the front deferred (segment_layout), read once
    per tensor on a GPU (cached by address and version, as the front does)."""
    bounds, _ = segment_layout(segs, num_classes, segs.device)
    assert bounds is not None
    return bounds


_HOST_SEGMENTS: Dict[Tuple, torch.Tensor] = {}


def _host_segments(bounds: Tuple[int, ...], device: str) -> torch.Tensor:
    """The offsets as an int64 tensor on ``device``, built (and copied to a GPU) once per layout."""
    key = (bounds, device)
    t = _HOST_SEGMENTS.get(key)
    if t is None:
        if len(_HOST_SEGMENTS) > 64:
            _HOST_SEGMENTS.clear()
        t = torch.tensor(bounds, dtype=torch.long).to(device)
        _HOST_SEGMENTS[key] = t
    return t
