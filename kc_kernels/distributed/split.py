"""Split segments: a segment cut by a shard boundary needs every rank's part of it for its row statistics (its
log-sum-exp in softmax mode, its L2 norm under a self-paced scale).

A rank's classes are planned as one fused range (whole segments, and every segment in sigmoid mode without a
scale: the public fused op) and at most two pieces of split segments, one at each end of its range. The pieces go
through kc_kernels.portable, the plain-PyTorch chunked loss, with one statistics column per split segment (over
all ranks) and a reduce hook that all-reduces the columns and, in backward, their gradients: every rank joins
those collectives, pieces or not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from kc_kernels import portable
from kc_kernels.distributed.collectives import row_statistics_reduce
from kc_kernels.distributed.sharding import segment_of, split_segments

__all__ = ["SplitPiece", "Plan", "make_plan", "split_segment_rows"]


@dataclass(frozen=True)
class SplitPiece:
    """The part [c0, c1) (global class ids) of split segment g held by this rank; column ``col`` of the
    statistics."""

    g: int
    c0: int
    c1: int
    col: int


@dataclass
class Plan:
    lo: int
    hi: int
    bounds: List[int]
    num_split: int  # S: split segments that need statistics, over all ranks
    fused: Optional[Tuple[int, int]] = None  # class range given to the fused op
    fused_segments: Tuple[int, int] = (0, 0)  # its segments [g0, g1)
    pieces: List[SplitPiece] = field(default_factory=list)


def make_plan(lo: int, hi: int, bounds: List[int], ranges: List[Tuple[int, int]], needs_stats: bool) -> Plan:
    split = split_segments(bounds, ranges) if needs_stats else []
    col_of = {g: i for i, g in enumerate(split)}
    plan = Plan(lo=lo, hi=hi, bounds=bounds, num_split=len(split))
    kept = []
    for g in range(segment_of(bounds, lo), segment_of(bounds, hi - 1) + 1):
        c0, c1 = max(bounds[g], lo), min(bounds[g + 1], hi)
        if g in col_of:
            plan.pieces.append(SplitPiece(g=g, c0=c0, c1=c1, col=col_of[g]))
        else:
            kept.append((g, c0, c1))
    if kept:  # split pieces can only sit at the two ends of the range, so the rest is contiguous
        plan.fused = (kept[0][1], kept[-1][2])
        plan.fused_segments = (kept[0][0], kept[-1][0] + 1)
    return plan


def split_segment_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       scale: Optional[torch.Tensor], plan: Plan, *, mode: str, temperature: float, target_index,
                       target_value, teacher_logits, scale_per_segment: bool, memory_budget: Optional[int],
                       group) -> torch.Tensor:
    """This rank's share of the per-row loss of the split segments: summed over ranks, their loss.

    ``weight``, ``bias``, a per-class ``scale`` and ``teacher_logits`` are the shard's (local class c is global
    class lo + c); x, the sparse targets (global ids) and a per-segment scale are global."""
    lo = plan.lo
    pieces = [portable.Piece(p.c0 - lo, p.c1 - lo, segment=p.g, column=p.col) for p in plan.pieces]
    return portable.soft_target_rows(
        x, weight, bias, scale, pieces=pieces, width=plan.num_split, mode=mode, temperature=temperature,
        target_index=target_index, target_value=target_value, target_offset=lo, teacher_logits=teacher_logits,
        scale_per_segment=scale_per_segment, chunk=portable.chunk_columns(x.shape[0], x.dtype, memory_budget),
        reduce=row_statistics_reduce(group))
