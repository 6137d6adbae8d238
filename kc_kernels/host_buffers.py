"""Host memory kept between calls: the scratch buffer of a walk and the op's large gradient outputs (a fresh
mapping per call is page-faulted in again every call; GPU memory is cached by torch's allocator already)."""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Dict, Tuple

import torch

# A fresh scratch buffer per call is a fresh mapping on the host: glibc serves requests above 32 MiB with mmap and
# unmaps them on free, so every call page-faulted its whole buffer again (what that cost: docs/performance.md,
# "Measurements behind choices in the code"). One buffer per dtype, up to WORKSPACE_MAX_BYTES, is kept between
# calls on the host: a call takes it (two calls at once never share one; the second allocates) and gives it back
# when done. GPU memory is cached by torch's allocator already.
WORKSPACE_MAX_BYTES = 64 << 20
_workspace: Dict[torch.dtype, torch.Tensor] = {}


def take_workspace(numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A 1-D buffer of at least ``numel`` elements (contents undefined): the kept host buffer when it is large
    enough, else a new one."""
    device = torch.device(device)
    if device.type == "cpu":
        held = _workspace.pop(dtype, None)
        if held is not None and held.numel() >= numel:
            return held
    return torch.empty(numel, dtype=dtype, device=device)


def give_back_workspace(buf: torch.Tensor) -> None:
    """Keep ``buf`` (a buffer from take_workspace, or a view of one, whose contents nobody reads any more) for the
    next call."""
    if buf._base is not None:  # a view: keep the whole buffer it was cut from
        buf = buf._base
    if buf.device.type != "cpu" or buf.numel() * buf.element_size() > WORKSPACE_MAX_BYTES or not buf.is_contiguous():
        return
    buf = buf.view(-1)
    held = _workspace.get(buf.dtype)
    if held is None or held.numel() < buf.numel():
        _workspace[buf.dtype] = buf


# The same holds for the op's large gradient outputs (dW [V, H], or dlogits [B, V] of soft_target_loss): a training
# loop drops them every step (optimizer.zero_grad() sets them to None) and the next call asked glibc for the
# memory again, whose first touch by the gradient GEMMs page-faulted it in (docs/performance.md).
# So the storage of the last such output of each shape and dtype is kept (as a tensor of its own over the same
# memory) and handed out again once nothing else refers to it: the storage's reference count is then the kept
# tensor's and the query's. A gradient still held (accumulation, a reference kept by the user, two calls before
# one backward) makes a new buffer. While the gradient lives, the kept tensor costs nothing (the memory is the
# gradient's); after it, its size, like a caching allocator. KEPT_OUTPUTS most recent shapes are kept.
KEPT_OUTPUT_MIN_BYTES = 16 << 20
KEPT_OUTPUTS = 4
_kept_outputs: "OrderedDict[Tuple, torch.Tensor]" = OrderedDict()
_kept_lock = threading.Lock()
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # a storage's reference count (absent: nothing kept)


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor of its own (not a view: no _base) over t's memory."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def output_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor for a gradient output the op writes in full (see above for the host's kept ones)."""
    device = torch.device(device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < KEPT_OUTPUT_MIN_BYTES or KEPT_OUTPUTS <= 0 or _use_count is None:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (tuple(shape), dtype)
    with _kept_lock:  # the check and the handing out in one step: two threads never get the same memory
        kept = _kept_outputs.get(key)
        held = None if kept is None else kept.untyped_storage()
        # referenced by the kept tensor and by ``held`` only, and still its size (nobody resized it)
        if kept is not None and held is not None and _use_count(held._cdata) == 2 and held.nbytes() >= nbytes:
            _kept_outputs.move_to_end(key)
            return _alias(kept)
        out = torch.empty(shape, dtype=dtype)
        _kept_outputs[key] = _alias(out)
        _kept_outputs.move_to_end(key)
        while len(_kept_outputs) > KEPT_OUTPUTS:
            _kept_outputs.popitem(last=False)
        return out


def release_host_buffers() -> None:
    """Drop the host memory kept between calls: the scratch buffers and the kept gradient outputs (the memory of a
    gradient that is still alive stays with it)."""
    with _kept_lock:
        _workspace.clear()
        _kept_outputs.clear()
