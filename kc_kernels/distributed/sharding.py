"""Sharding the classes: contiguous class ranges, one per rank, and the segments that a shard boundary cuts."""
from __future__ import annotations

import bisect
from typing import List, Optional, Sequence, Tuple, Union

import torch

from kc_kernels.ops.checks import fail

__all__ = ["bounds_of", "shard_classes", "segment_of", "split_segments", "check_tiling"]


def bounds_of(segments_or_classes) -> Tuple[int, Optional[List[int]]]:
    """(V, segment offsets or None) of a class count or of G + 1 offsets (list or tensor)."""
    if isinstance(segments_or_classes, int):
        return segments_or_classes, None
    bounds = [int(b) for b in (segments_or_classes.tolist() if torch.is_tensor(segments_or_classes)
                               else segments_or_classes)]
    return bounds[-1], bounds


def shard_classes(segments_or_classes: Union[int, Sequence[int], torch.Tensor], world_size: int,
                  align: bool = True) -> List[Tuple[int, int]]:
    """Contiguous class ranges (lo, hi), one per rank, tiling [0, V).

    Given the number of classes V, or segment offsets (G + 1 values from 0 to V). With ``align`` each cut is the
    segment boundary nearest to the even cut k V / W among those that leave every later rank a segment of its
    own, so with G >= W every rank holds whole segments and per-segment softmax stays local to a rank. With fewer
    segments than ranks some cuts fall inside a segment, which the op handles by merging that segment's
    statistics across ranks. ``align=False`` gives even shards.
    """
    V, bounds = bounds_of(segments_or_classes)
    if world_size < 1:
        fail("world_size", f"must be >= 1, got {world_size}")
    if V < world_size:
        fail("segments_or_classes", f"{V} classes cannot give each of {world_size} ranks at least one")
    cuts = [0]
    for k in range(1, world_size):
        ideal = k * V / world_size
        latest = V - (world_size - k)  # leave every later rank at least one class
        cut = None
        if align and bounds is not None:
            # boundaries after the last cut that leave at least one whole segment to each later rank
            first = bisect.bisect_right(bounds, cuts[-1])
            last = len(bounds) - 1 - (world_size - k)
            whole = bounds[first:last + 1]
            if whole:
                cut = min(whole, key=lambda b: abs(b - ideal))
            else:  # too few segments left: the nearest boundary that still leaves every later rank a class
                pos = bisect.bisect_left(bounds, ideal)
                near = [b for b in bounds[max(pos - 1, 0):pos + 1] if cuts[-1] < b <= latest]
                cut = min(near, key=lambda b: abs(b - ideal)) if near else None
        if cut is None:
            cut = min(max(int(round(ideal)), cuts[-1] + 1), latest)
        cuts.append(cut)
    cuts.append(V)
    return [(cuts[r], cuts[r + 1]) for r in range(world_size)]


def segment_of(bounds: List[int], c: int) -> int:
    """The segment holding class c."""
    return bisect.bisect_right(bounds, c) - 1


def split_segments(bounds: List[int], ranges: List[Tuple[int, int]]) -> List[int]:
    """Segments cut by a shard boundary, in order."""
    cut = {segment_of(bounds, lo) for lo, _ in ranges[1:] if bounds[bisect.bisect_left(bounds, lo)] != lo}
    return sorted(cut)


def check_tiling(ranges: List[Tuple[int, int]], num_classes: int) -> None:
    """ValueError naming ``class_range`` unless the ranks' ranges tile [0, V) in rank order."""
    if ranges[0][0] != 0 or ranges[-1][1] != num_classes or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        fail("class_range", f"the ranks' ranges {ranges} do not tile [0, {num_classes}) in rank order")
