"""The collectives of the vocab-parallel ops, each counted by kc_kernels.distributed.accounting.

Two autograd-aware ones, as Megatron's tensor-parallel regions: ``copy_to_ranks`` (identity forward, the sum over
ranks of the gradient backward: a replicated input that every rank uses for its own classes) and
``sum_over_ranks`` (the sum over ranks forward, identity backward: a result that every rank then uses in the same
way, so each back-propagates the same gradient into it). Everything else is a plain, counted collective.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch
import torch.distributed as dist

from kc_kernels.distributed.accounting import record

__all__ = ["world", "rank", "all_reduce", "gather_ranges", "copy_to_ranks", "sum_over_ranks", "gather_rows",
           "check_rows", "row_statistics_reduce"]


def world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group) -> int:
    return dist.get_rank(group) if world(group) > 1 else 0


def all_reduce(name: str, t: torch.Tensor, group, op=None) -> torch.Tensor:
    """All-reduce ``t`` in place (sum unless ``op``) and return it; a no-op in one process."""
    record(name, t)
    if world(group) > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


def row_statistics_reduce(group) -> Callable[[str, torch.Tensor, str], torch.Tensor]:
    """The ``reduce`` hook of kc_kernels.portable across the ranks of ``group``: its [B, S] row statistics and
    their gradients are summed (the maxima maxed) in place."""

    def reduce(name: str, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return all_reduce(name, t, group, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)

    return reduce


def gather_ranges(lo: int, hi: int, device, group) -> List[Tuple[int, int]]:
    """Every rank's (lo, hi), in rank order."""
    mine = torch.tensor([lo, hi], dtype=torch.long, device=device)
    w = world(group)
    out = [torch.empty_like(mine) for _ in range(w)]
    record("class_ranges", torch.empty(w * 2, dtype=torch.long))
    if w > 1:
        dist.all_gather(out, mine, group=group)
    else:
        out = [mine]
    return [tuple(int(v) for v in t.tolist()) for t in out]


class _CopyToRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group, name):
        ctx.group, ctx.name = group, name
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(ctx.name, grad.contiguous().clone(), ctx.group), None, None


def copy_to_ranks(t: torch.Tensor, group, name: str) -> torch.Tensor:
    """``t``, replicated on every rank; its gradient is summed over ranks (named ``name`` in the log)."""
    return _CopyToRanks.apply(t, group, name)


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group, name):
        return all_reduce(name, t.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def sum_over_ranks(t: torch.Tensor, group, name: str) -> torch.Tensor:
    """The sum over ranks of each rank's ``t``. Backward is the identity: every rank holds the same sum and goes
    on with the same function of it (the global loss), so each back-propagates the same gradient."""
    return _SumOverRanks.apply(t, group, name)


class _GatherRows(torch.autograd.Function):
    """x sharded by rows (rank r holds ``counts[r]`` consecutive rows of the batch): forward all-gathers the
    whole batch (each share padded to the largest), backward reduce-scatters dx, so that each rank receives the
    sum over ranks of its own rows' gradient: half the traffic of all-reducing the whole dx."""

    @staticmethod
    def forward(ctx, x, counts, group):
        w, r = world(group), rank(group)
        m = max(counts)
        ctx.counts, ctx.group, ctx.rank, ctx.m = counts, group, r, m
        pad = x.new_zeros((m,) + tuple(x.shape[1:]))
        pad[:x.shape[0]] = x
        out = x.new_empty((w * m,) + tuple(x.shape[1:]))
        record("gather_x", out)
        if w > 1:
            dist.all_gather_into_tensor(out, pad, group=group)
        else:
            out.copy_(pad)
        return torch.cat([out[i * m:i * m + c] for i, c in enumerate(counts)])

    @staticmethod
    def backward(ctx, grad):
        counts, m = ctx.counts, ctx.m
        pad = grad.new_zeros((len(counts) * m,) + tuple(grad.shape[1:]))
        start = 0
        for i, c in enumerate(counts):
            pad[i * m:i * m + c] = grad[start:start + c]
            start += c
        record("grad_x", pad)
        out = grad.new_empty((m,) + tuple(grad.shape[1:]))
        if len(counts) > 1:
            dist.reduce_scatter_tensor(out, pad, group=ctx.group)
        else:
            out.copy_(pad)
        return out[:counts[ctx.rank]], None, None


def gather_rows(x: torch.Tensor, counts: List[int], group) -> torch.Tensor:
    """The whole batch from each rank's rows (see _GatherRows)."""
    return _GatherRows.apply(x, counts, group)


def check_rows(x_rows, x: torch.Tensor, group) -> List[int]:
    """The row counts of ``x_rows``, one per rank, checked against this rank's x."""
    w = world(group)
    try:
        counts = [int(c) for c in x_rows]
    except (TypeError, ValueError):
        raise ValueError(f"x_rows: expected a sequence of row counts, one per rank, got {x_rows!r}") from None
    if len(counts) != w or any(c < 0 for c in counts) or sum(counts) == 0:
        raise ValueError(f"x_rows: needs {w} row counts >= 0 (one per rank, rank order) with a positive sum, "
                         f"got {counts}")
    if x.shape[0] != counts[rank(group)]:
        raise ValueError(f"x: this rank holds {x.shape[0]} rows but x_rows gives it {counts[rank(group)]}")
    return counts
