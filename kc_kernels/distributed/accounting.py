"""Communication accounting: what the vocab-parallel ops send, counted as they run and computed ahead of time."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from kc_kernels.distributed.sharding import bounds_of, shard_classes, split_segments

__all__ = ["count_communication", "record", "communication_bytes"]

_COUNTERS: List[List[Tuple[str, int]]] = []


@contextlib.contextmanager
def count_communication() -> Iterator[List[Tuple[str, int]]]:
    """Record every collective the vocab-parallel ops issue inside the block: a list of (name, bytes), bytes being
    the reduced (or gathered) tensor's numel times its element size."""
    log: List[Tuple[str, int]] = []
    _COUNTERS.append(log)
    try:
        yield log
    finally:
        _COUNTERS.remove(log)


def record(name: str, t: torch.Tensor) -> None:
    """Count collective ``name`` on ``t`` in every open ``count_communication`` block."""
    for log in _COUNTERS:
        log.append((name, t.numel() * t.element_size()))


def communication_bytes(batch: int, hidden: int, num_classes: int, world_size: int, *, segments=None,
                        class_ranges: Optional[List[Tuple[int, int]]] = None, mode: str = "sigmoid",
                        scale: Optional[str] = None, dense_teacher: bool = False, grouped: bool = False,
                        dtype: torch.dtype = torch.float32, x_rows: Optional[Sequence[int]] = None
                        ) -> Dict[str, int]:
    """Bytes of every collective of one forward + backward step of ``vocab_parallel_linear_soft_target_loss``, per
    rank (numel x element size of the tensor reduced or gathered; a ring all-reduce moves about 2 (W - 1) / W times
    that over each rank's link, a ring all-gather or reduce-scatter (W - 1) / W times).

    ``scale``: None, "segment" or "class"; ``class_ranges`` defaults to ``shard_classes(segments, W)``;
    ``x_rows``: x sharded by rows (the op's argument): x is all-gathered and dx reduce-scattered, both padded to
    the largest share. Also returns ``logits_avoided``: the [B, V] logits and their gradient in ``dtype`` that
    the op never holds.
    """
    bounds = [0, num_classes] if segments is None else bounds_of(segments)[1]
    ranges = class_ranges or shard_classes(bounds if segments is not None else num_classes, world_size)
    G = len(bounds) - 1
    S = len(split_segments(bounds, ranges)) if (mode == "softmax" or scale) else 0
    stat = 8 if dtype == torch.float64 else 4
    elem = torch.empty((), dtype=dtype).element_size()
    out = {"class_ranges": world_size * 2 * 8}
    # a split segment's row statistics ([B, S]) forward, and their gradients in backward
    if S and scale:
        out["sum_of_squares"] = batch * S * stat
        out["grad_sum_of_squares"] = batch * S * stat
    if S and mode == "softmax":
        width = 2 * S if dense_teacher else S  # a dense teacher's log-sum-exp rides along (no gradient)
        out["max"] = batch * width * stat
        out["sum_exp"] = batch * width * stat
        out["grad_sum_exp"] = batch * S * stat
    out["loss"] = batch * stat
    per_row = (G if grouped else 1) * hidden * elem
    if x_rows is not None:
        padded_rows = max(x_rows) * len(x_rows)
        out["gather_x"] = padded_rows * per_row
        out["grad_x"] = padded_rows * per_row  # reduce-scattered: half an all-reduce's traffic
    else:
        out["grad_x"] = batch * per_row
    if scale == "segment":
        out["grad_scale"] = G * elem
    out["total"] = sum(out.values())
    out["logits_avoided"] = 2 * batch * num_classes * elem
    return out
