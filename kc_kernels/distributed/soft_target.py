"""``vocab_parallel_linear_soft_target_loss``: the fused linear + soft-target loss with its classes sharded across
the ranks of a process group."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from kc_kernels.distributed.collectives import check_rows, copy_to_ranks, gather_ranges, gather_rows, sum_over_ranks
from kc_kernels.distributed.sharding import bounds_of, check_tiling
from kc_kernels.distributed.split import Plan, make_plan, split_segment_rows
from kc_kernels.ops import linear_soft_target_loss
from kc_kernels.ops.checks import fail
from kc_kernels.reduction import compute_dtype, reduce_loss

__all__ = ["vocab_parallel_linear_soft_target_loss"]


def _check(x, weight, bias, lo, hi, V, bounds, target_index, target_value, teacher_logits, scale, mode):
    if not (0 <= lo < hi <= V):
        fail("class_range", f"({lo}, {hi}) is not a non-empty range inside [0, {V})")
    if weight.dim() != 2 or weight.shape[0] != hi - lo:
        fail("weight_shard", f"must be [{hi - lo}, H] for class_range ({lo}, {hi}), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (hi - lo,):
        fail("bias_shard", f"must be [{hi - lo}], got {tuple(bias.shape)}")
    if bounds[0] != 0 or bounds[-1] != V or any(a >= b for a, b in zip(bounds, bounds[1:])):
        fail("segments", f"must increase strictly from 0 to num_classes={V}")
    if x.dim() == 3 and x.shape[1] != len(bounds) - 1:
        fail("x", f"grouped x has {x.shape[1]} groups but there are {len(bounds) - 1} segments")
    if mode not in ("sigmoid", "softmax"):
        fail("mode", f"must be 'sigmoid' or 'softmax', got {mode!r}")
    if (target_index is None) == (teacher_logits is None):
        fail("target_index", "give either target_index/target_value (global class ids) or teacher_logits (shard)")
    if target_index is not None and (target_value is None or target_value.shape != target_index.shape):
        fail("target_value", "must be given with target_index, of the same shape")
    if teacher_logits is not None and tuple(teacher_logits.shape) != (x.shape[0], hi - lo):
        fail("teacher_logits", f"must be the shard's [{x.shape[0]}, {hi - lo}], got {tuple(teacher_logits.shape)}")
    if scale is not None and scale.numel() not in (len(bounds) - 1, hi - lo):
        fail("scale", f"must be per segment [{len(bounds) - 1}] or the shard's per class [{hi - lo}]")


def _fused_part(x, weight, bias, scale, plan: Plan, scale_per_segment, kw, backend, memory_budget):
    """The rank's classes that need no cross-rank statistic, through the public fused op."""
    a, b = plan.fused
    g0, g1 = plan.fused_segments
    lo = plan.lo
    local_bounds = [a] + [o for o in plan.bounds[g0 + 1:g1] if a < o < b] + [b]
    local_bounds = [o - a for o in local_bounds]
    targets = {}
    if kw["teacher_logits"] is not None:
        targets["teacher_logits"] = kw["teacher_logits"][:, a - lo:b - lo]
    else:
        idx = kw["target_index"]
        inside = (idx >= a) & (idx < b)
        targets["target_index"] = torch.where(inside, idx - a, torch.full_like(idx, -1))
        targets["target_value"] = kw["target_value"]
    if scale is not None:
        scale = scale[g0:g1] if scale_per_segment else scale[a - lo:b - lo]
    xs = x[:, g0:g1] if x.dim() == 3 else x
    return linear_soft_target_loss(
        xs, weight[a - lo:b - lo], None if bias is None else bias[a - lo:b - lo], **targets, mode=kw["mode"],
        segments=torch.tensor(local_bounds, device=x.device) if len(local_bounds) > 2 or xs.dim() == 3 else None,
        scale=scale,
        temperature=kw["temperature"], reduction="none", backend=backend, memory_budget=memory_budget)


def vocab_parallel_linear_soft_target_loss(
        x: torch.Tensor, weight_shard: torch.Tensor, bias_shard: Optional[torch.Tensor] = None, *,
        class_range: Tuple[int, int], num_classes: int, target_index: Optional[torch.Tensor] = None,
        target_value: Optional[torch.Tensor] = None, teacher_logits: Optional[torch.Tensor] = None,
        mode: str = "sigmoid", segments=None, scale: Optional[torch.Tensor] = None, temperature: float = 1.0,
        sample_weight: Optional[torch.Tensor] = None, reduction: str = "mean", backend: str = "auto",
        memory_budget: Optional[int] = None, group=None, scale_kind: Optional[str] = None,
        x_rows: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``linear_soft_target_loss`` with the classes sharded over the ranks of ``group``.

    This rank holds classes ``class_range = (lo, hi)`` of ``num_classes``: ``weight_shard`` [hi - lo, H] and
    ``bias_shard`` [hi - lo]; the ranges of the group's ranks, in rank order, must tile [0, V) (``shard_classes``
    makes them). Replicated on every rank: x [B, H] (or grouped [B, G, H]), ``target_index``/``target_value``
    with global class ids, ``segments`` (global offsets), ``sample_weight``. ``teacher_logits`` is the shard's
    [B, hi - lo]. ``scale`` is the global per-segment [G] (replicated; its gradient is summed over ranks) or the
    shard's per-class [hi - lo]; ``scale_kind`` ("segment" or "class") says which, and is needed only where
    G == hi - lo (without it a per-segment reading wins).

    Returns the global loss, the same on every rank; backward sums dx over ranks and leaves the weight, bias and
    per-class scale gradients local to the shard. Every rank must call this with the same shapes and options.

    With ``x_rows`` (row counts, one per rank, in rank order) x is sharded by rows instead: this rank holds its
    ``x_rows[rank]`` consecutive rows of the batch (the targets, teacher logits and sample weights still cover
    the whole batch). The op all-gathers x and, in backward, reduce-scatters dx: each rank gets its own rows'
    gradient, summed over the ranks' classes, for half the traffic of an all-reduce of the whole dx.
    """
    if x_rows is not None:
        x = gather_rows(x, check_rows(x_rows, x, group), group)
    lo, hi = (int(v) for v in class_range)
    V = int(num_classes)
    bounds = [0, V] if segments is None else bounds_of(segments)[1]
    _check(x, weight_shard, bias_shard, lo, hi, V, bounds, target_index, target_value, teacher_logits, scale, mode)
    if reduction not in ("none", "sum", "mean"):
        fail("reduction", f"must be 'none', 'sum' or 'mean', got {reduction!r}")
    ranges = gather_ranges(lo, hi, x.device, group)
    check_tiling(ranges, V)
    if scale_kind not in (None, "segment", "class"):
        fail("scale_kind", f"must be None, 'segment' or 'class', got {scale_kind!r}")
    if scale is not None and scale_kind is not None:
        want = len(bounds) - 1 if scale_kind == "segment" else hi - lo
        if scale.numel() != want:
            fail("scale", f"scale_kind={scale_kind!r} needs {want} values, got {scale.numel()}")
    scale_per_segment = scale is not None and (scale.numel() == len(bounds) - 1 if scale_kind is None
                                               else scale_kind == "segment")
    plan = make_plan(lo, hi, bounds, ranges, needs_stats=mode == "softmax" or scale is not None)

    x_all = x if x_rows is not None else copy_to_ranks(x, group, "grad_x")  # gathered rows: dx is scattered
    scale_all = copy_to_ranks(scale, group, "grad_scale") if scale_per_segment else scale
    kw = dict(target_index=target_index, target_value=target_value, teacher_logits=teacher_logits, mode=mode,
              temperature=float(temperature))
    parts = []
    if plan.fused is not None:
        parts.append(_fused_part(x_all, weight_shard, bias_shard, scale_all, plan, scale_per_segment, kw, backend,
                                 memory_budget))
    if plan.num_split:  # every rank joins the statistics' collectives, with or without pieces of its own
        parts.append(split_segment_rows(x_all, weight_shard, bias_shard, scale_all, plan,
                                        scale_per_segment=scale_per_segment, memory_budget=memory_budget,
                                        group=group, **kw))
    dt = compute_dtype(x.dtype)
    per_row = sum(p.to(dt) for p in parts)
    per_row = sum_over_ranks(per_row, group, "loss")
    return reduce_loss(per_row, sample_weight, reduction)
