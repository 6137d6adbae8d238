"""Vocab-parallel linear + soft-target loss: the class dimension sharded across torch.distributed ranks.

Each rank holds a contiguous class range [lo, hi) of the output layer (its rows of weight, bias and, per class,
scale); x and the sparse targets are replicated. Every rank returns the same global loss, equal to the
single-process ``linear_soft_target_loss`` on the full layer.

How a rank computes its part:

- Segments wholly inside the rank's range (all of them when ``shard_classes`` aligned the shards), and every
  segment in sigmoid mode without a scale, go through the public fused op with local segments and targets remapped
  to local ids: no [B, V] buffer and no communication beyond the per-row loss.
- A segment split across ranks needs cross-rank statistics when the mode is softmax (its log-sum-exp, and for
  dense teachers the teacher's) or a self-paced scale is on (its L2 norm, and in the gradient the segment's
  ``sum_j q_j a_j u_j``). Those pieces (at most two per rank: the ends of its range) run in plain torch math over
  column blocks ([B, block] buffers, never [B, V]) with the gradient derived analytically (docs/ops.md); this path
  is correct and memory-bounded but slower than the fused one.

Communication per step: an all-gather of the class ranges (W pairs of int64, which also checks that the ranges
tile [0, V)), all-reduces of [B, S] statistics for the S split segments that need them, an all-reduce of the [B]
per-row loss, and in backward an all-reduce of dx and of a per-segment scale's gradient. ``communication_bytes``
computes these; ``count_communication`` measures them.
"""
from __future__ import annotations

import bisect
import contextlib
import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kc_kernels.ops import linear_soft_target_loss

__all__ = [
    "shard_classes",
    "vocab_parallel_linear_soft_target_loss",
    "vocab_parallel_sampled_softmax_loss",
    "communication_bytes",
    "count_communication",
]

NORM_EPS = 1e-12  # the op's epsilon under the self-paced scale (kc_kernels/reference.py)
_BLOCK_BUDGET = 64 << 20  # bytes of [B, block] temporaries the split-segment path may hold at once
_BLOCK_TEMPS = 6  # [B, block] temporaries alive at once in the split-segment path (u, y, z, q, du, mask)


def _fail(name: str, msg: str):
    raise ValueError(f"{name}: {msg}")


# --------------------------------------------------------------------------------------------------- sharding

def _bounds_of(segments_or_classes) -> Tuple[int, Optional[List[int]]]:
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
    V, bounds = _bounds_of(segments_or_classes)
    if world_size < 1:
        _fail("world_size", f"must be >= 1, got {world_size}")
    if V < world_size:
        _fail("segments_or_classes", f"{V} classes cannot give each of {world_size} ranks at least one")
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


# ---------------------------------------------------------------------------------------------- collectives

_COUNTERS: List[List[Tuple[str, int]]] = []


@contextlib.contextmanager
def count_communication() -> Iterator[List[Tuple[str, int]]]:
    """Record every collective this module issues inside the block: a list of (name, bytes), bytes being the
    reduced (or gathered) tensor's numel times its element size."""
    log: List[Tuple[str, int]] = []
    _COUNTERS.append(log)
    try:
        yield log
    finally:
        _COUNTERS.remove(log)


def _record(name: str, t: torch.Tensor):
    for log in _COUNTERS:
        log.append((name, t.numel() * t.element_size()))


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(name: str, t: torch.Tensor, group, op=None) -> torch.Tensor:
    _record(name, t)
    if _world(group) > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


def _gather_ranges(lo: int, hi: int, device, group) -> List[Tuple[int, int]]:
    mine = torch.tensor([lo, hi], dtype=torch.long, device=device)
    world = _world(group)
    out = [torch.empty_like(mine) for _ in range(world)]
    _record("class_ranges", torch.empty(world * 2, dtype=torch.long))
    if world > 1:
        dist.all_gather(out, mine, group=group)
    else:
        out = [mine]
    return [tuple(int(v) for v in t.tolist()) for t in out]


class _CopyToRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ranks (x and a per-segment scale are replicated, and
    each rank's classes contribute their share of its gradient)."""

    @staticmethod
    def forward(ctx, t, group, name):
        ctx.group, ctx.name = group, name
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(ctx.name, grad.contiguous().clone(), ctx.group), None, None


class _GatherRows(torch.autograd.Function):
    """x sharded by rows (rank r holds ``counts[r]`` consecutive rows of the batch): forward all-gathers the
    whole batch (each share padded to the largest), backward reduce-scatters dx, so that each rank receives the
    sum over ranks of its own rows' gradient: half the traffic of all-reducing the whole dx."""

    @staticmethod
    def forward(ctx, x, counts, group):
        world, rank = _world(group), dist.get_rank(group) if _world(group) > 1 else 0
        m = max(counts)
        ctx.counts, ctx.group, ctx.rank, ctx.m = counts, group, rank, m
        pad = x.new_zeros((m,) + tuple(x.shape[1:]))
        pad[:x.shape[0]] = x
        out = x.new_empty((world * m,) + tuple(x.shape[1:]))
        _record("gather_x", out)
        if world > 1:
            dist.all_gather_into_tensor(out, pad, group=group)
        else:
            out.copy_(pad)
        return torch.cat([out[r * m:r * m + c] for r, c in enumerate(counts)])

    @staticmethod
    def backward(ctx, grad):
        counts, m = ctx.counts, ctx.m
        pad = grad.new_zeros((len(counts) * m,) + tuple(grad.shape[1:]))
        start = 0
        for r, c in enumerate(counts):
            pad[r * m:r * m + c] = grad[start:start + c]
            start += c
        _record("grad_x", pad)
        out = grad.new_empty((m,) + tuple(grad.shape[1:]))
        if len(counts) > 1:
            dist.reduce_scatter_tensor(out, pad, group=ctx.group)
        else:
            out.copy_(pad)
        return out[:counts[ctx.rank]], None, None


def _check_rows(x_rows, x: torch.Tensor, group) -> List[int]:
    world = _world(group)
    try:
        counts = [int(c) for c in x_rows]
    except (TypeError, ValueError):
        _fail("x_rows", f"expected a sequence of row counts, one per rank, got {x_rows!r}")
    if len(counts) != world or any(c < 0 for c in counts) or sum(counts) == 0:
        _fail("x_rows", f"needs {world} row counts >= 0 (one per rank, rank order) with a positive sum, got {counts}")
    rank = dist.get_rank(group) if world > 1 else 0
    if x.shape[0] != counts[rank]:
        _fail("x", f"this rank holds {x.shape[0]} rows but x_rows gives it {counts[rank]}")
    return counts


class _SumOverRanks(torch.autograd.Function):
    """Sums the per-row loss over ranks. Backward is the identity: every rank holds the same global loss and
    back-propagates the same gradient into it."""

    @staticmethod
    def forward(ctx, t, group):
        return _all_reduce("loss", t.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# ----------------------------------------------------------------------------------------------------- plan

@dataclass
class _Piece:
    """The part [c0, c1) of split segment g held by this rank; column ``col`` of the [B, S] statistics."""

    g: int
    c0: int
    c1: int
    col: int
    owner: bool  # this rank adds the segment's m * lse term (exactly one rank does)


@dataclass
class _Plan:
    lo: int
    hi: int
    bounds: List[int]
    num_split: int  # S: split segments that need statistics, over all ranks
    fused: Optional[Tuple[int, int]] = None  # class range given to the fused op
    fused_segments: Tuple[int, int] = (0, 0)  # its segments [g0, g1)
    pieces: List[_Piece] = field(default_factory=list)


def _segment_of(bounds: List[int], c: int) -> int:
    return bisect.bisect_right(bounds, c) - 1


def split_segments(bounds: List[int], ranges: List[Tuple[int, int]]) -> List[int]:
    """Segments cut by a shard boundary, in order."""
    cut = {_segment_of(bounds, lo) for lo, _ in ranges[1:] if bounds[bisect.bisect_left(bounds, lo)] != lo}
    return sorted(cut)


def _make_plan(lo: int, hi: int, bounds: List[int], ranges: List[Tuple[int, int]], needs_stats: bool) -> _Plan:
    split = split_segments(bounds, ranges) if needs_stats else []
    col_of = {g: i for i, g in enumerate(split)}
    plan = _Plan(lo=lo, hi=hi, bounds=bounds, num_split=len(split))
    kept = []
    for g in range(_segment_of(bounds, lo), _segment_of(bounds, hi - 1) + 1):
        c0, c1 = max(bounds[g], lo), min(bounds[g + 1], hi)
        if g in col_of:
            plan.pieces.append(_Piece(g=g, c0=c0, c1=c1, col=col_of[g], owner=bounds[g] >= lo))
        else:
            kept.append((g, c0, c1))
    if kept:  # split pieces can only sit at the two ends of the range, so the rest is contiguous
        plan.fused = (kept[0][1], kept[-1][2])
        plan.fused_segments = (kept[0][0], kept[-1][0] + 1)
    return plan


# ------------------------------------------------------------------------------------- split-segment pieces

@dataclass
class _PieceInputs:
    """Everything the split-segment path reads besides the differentiable tensors."""

    plan: _Plan
    mode: str
    temperature: float
    target_index: Optional[torch.Tensor]
    target_value: Optional[torch.Tensor]
    teacher_logits: Optional[torch.Tensor]  # the shard's [B, hi - lo]
    scale_per_segment: bool
    group: object
    block: int


def _blocks(inp: _PieceInputs):
    for piece in inp.plan.pieces:
        for c0 in range(piece.c0, piece.c1, inp.block):
            yield piece, c0, min(c0 + inp.block, piece.c1)


def _raw_scores(x, weight, inp, piece, c0, c1, dt):
    xs = x[:, piece.g] if x.dim() == 3 else x
    lo = inp.plan.lo
    return xs.to(dt) @ weight[c0 - lo:c1 - lo].to(dt).t(), xs


def _gamma(scale, inp, piece, c0, c1, dt):
    if scale is None:
        return None
    if inp.scale_per_segment:
        return scale[piece.g].to(dt)
    return scale[c0 - inp.plan.lo:c1 - inp.plan.lo].to(dt)


def _logits(u, bias, gamma, norm, inp, c0, c1, dt):
    y = u if gamma is None else gamma * u / norm[:, None]
    if bias is not None:
        y = y + bias[c0 - inp.plan.lo:c1 - inp.plan.lo].to(dt)
    return y / inp.temperature


def _targets(inp, stats, piece, c0, c1, B, dt, device):
    if inp.teacher_logits is not None:
        t = inp.teacher_logits[:, c0 - inp.plan.lo:c1 - inp.plan.lo].to(dt) / inp.temperature
        if inp.mode == "sigmoid":
            return torch.sigmoid(t)
        return torch.exp(t - stats["teacher_lse"][:, piece.col:piece.col + 1])
    idx = inp.target_index
    inside = (idx >= c0) & (idx < c1)
    z = torch.zeros(B, c1 - c0, dtype=dt, device=device)
    return z.scatter_add(1, torch.where(inside, idx - c0, 0).long(),
                         torch.where(inside, inp.target_value.to(dt), torch.zeros((), dtype=dt, device=device)))


def _segment_mass(inp, piece, B, dt, device):
    """m = sum of the segment's targets, from the replicated global targets (no communication)."""
    if inp.teacher_logits is not None:
        return torch.ones(B, dtype=dt, device=device)  # a softmax over the segment sums to 1
    lo, hi = inp.plan.bounds[piece.g], inp.plan.bounds[piece.g + 1]
    idx = inp.target_index
    inside = (idx >= lo) & (idx < hi)
    return torch.where(inside, inp.target_value.to(dt), torch.zeros((), dtype=dt, device=device)).sum(dim=1)


def _dl_dy(y, z, stats, mass, inp, piece):
    """q = dl/dy per row, for a unit gradient on each row's loss."""
    if inp.mode == "sigmoid":
        return torch.sigmoid(y) - z
    p = torch.exp(y - stats["lse"][:, piece.col:piece.col + 1])
    return inp.temperature ** 2 * (mass[piece.col][:, None] * p - z)


def _norm_stats(x, weight, inp, B, dt):
    sq = torch.zeros(B, inp.plan.num_split, dtype=dt, device=x.device)
    for piece, c0, c1 in _blocks(inp):
        u, _ = _raw_scores(x, weight, inp, piece, c0, c1, dt)
        sq[:, piece.col] += (u * u).sum(dim=1)
    return torch.sqrt(_all_reduce("sum_of_squares", sq, inp.group) + NORM_EPS)


def _lse_stats(x, weight, bias, scale, inp, stats, B, dt):
    """Each split segment's log-sum-exp (and the dense teacher's) merged over ranks: all-reduce max, then the
    sum of exp rescaled to it. Local maxima and sums are kept online, so this is one pass over the blocks."""
    S = inp.plan.num_split
    dense = inp.teacher_logits is not None and inp.mode == "softmax"
    width = 2 * S if dense else S
    mx = torch.full((B, width), -math.inf, dtype=dt, device=x.device)
    se = torch.zeros(B, width, dtype=dt, device=x.device)

    def merge(col, v):
        new = torch.maximum(mx[:, col], v.max(dim=1).values)
        se[:, col] = se[:, col] * torch.exp(mx[:, col] - new) + torch.exp(v - new[:, None]).sum(dim=1)
        mx[:, col] = new

    for piece, c0, c1 in _blocks(inp):
        u, _ = _raw_scores(x, weight, inp, piece, c0, c1, dt)
        gamma = _gamma(scale, inp, piece, c0, c1, dt)
        norm = stats["norm"][:, piece.col] if "norm" in stats else None
        merge(piece.col, _logits(u, bias, gamma, norm, inp, c0, c1, dt))
        if dense:
            t = inp.teacher_logits[:, c0 - inp.plan.lo:c1 - inp.plan.lo].to(dt) / inp.temperature
            merge(S + piece.col, t)
    local_max = mx.clone()
    gmax = _all_reduce("max", mx, inp.group, dist.ReduceOp.MAX)
    # columns this rank does not touch have local max -inf and sum 0: keep them 0 instead of 0 * exp(nan)
    factor = torch.where(torch.isinf(local_max), torch.zeros_like(se), torch.exp(local_max - gmax))
    lse = gmax + torch.log(_all_reduce("sum_exp", se * factor, inp.group))
    stats["lse"] = lse[:, :S]
    if dense:
        stats["teacher_lse"] = lse[:, S:]


def _piece_terms(x, weight, bias, scale, inp, stats, mass, B, dt):
    """Per-row loss of this rank's pieces and, under a scale, each segment's c = sum_j q_j a_j u_j."""
    T = inp.temperature
    loss = torch.zeros(B, dtype=dt, device=x.device)
    c = torch.zeros(B, inp.plan.num_split, dtype=dt, device=x.device)
    for piece, c0, c1 in _blocks(inp):
        u, _ = _raw_scores(x, weight, inp, piece, c0, c1, dt)
        gamma = _gamma(scale, inp, piece, c0, c1, dt)
        norm = stats["norm"][:, piece.col] if "norm" in stats else None
        y = _logits(u, bias, gamma, norm, inp, c0, c1, dt)
        z = _targets(inp, stats, piece, c0, c1, B, dt, x.device)
        if inp.mode == "sigmoid":
            loss += (F.softplus(y) - z * y).sum(dim=1)
        else:
            loss -= T ** 2 * (z * y).sum(dim=1)
        if gamma is not None:
            q = _dl_dy(y, z, stats, mass, inp, piece)
            c[:, piece.col] += (q * (gamma / (norm[:, None] * T)) * u).sum(dim=1)
    if inp.mode == "softmax":
        for piece in inp.plan.pieces:
            if piece.owner:  # the segment's m * lse enters the global loss once
                loss += T ** 2 * mass[piece.col] * stats["lse"][:, piece.col]
    if scale is not None and inp.plan.num_split:
        stats["c"] = _all_reduce("scale_term", c, inp.group)
    return loss


class _SplitSegments(torch.autograd.Function):
    """The split-segment pieces of one rank: per-row loss forward, analytic gradient backward (docs/ops.md:
    q = sigmoid(y) - z or T^2 (m softmax(y) - z) with the segment's global log-sum-exp; under a scale
    dl/du_i = a_i q_i - (u_i / n^2) c with n and c summed over the whole segment)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, inp: _PieceInputs):
        B = x.shape[0]
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        stats: Dict[str, torch.Tensor] = {}
        if scale is not None:
            stats["norm"] = _norm_stats(x, weight, inp, B, dt)
        mass = {}
        if inp.mode == "softmax":
            _lse_stats(x, weight, bias, scale, inp, stats, B, dt)
            mass = {p.col: _segment_mass(inp, p, B, dt, x.device) for p in inp.plan.pieces}
        loss = _piece_terms(x, weight, bias, scale, inp, stats, mass, B, dt)
        ctx.inp, ctx.stats, ctx.mass = inp, stats, mass
        ctx.save_for_backward(x, weight, bias, scale)
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, scale = ctx.saved_tensors
        inp, stats, mass = ctx.inp, ctx.stats, ctx.mass
        dt = grad.dtype if grad.dtype == torch.float64 else torch.float32
        B, T, lo = x.shape[0], inp.temperature, inp.plan.lo
        g = grad.to(dt)[:, None]
        dx = torch.zeros(x.shape, dtype=dt, device=x.device)
        dw = torch.zeros(weight.shape, dtype=dt, device=x.device)
        db = None if bias is None else torch.zeros(bias.shape, dtype=dt, device=x.device)
        ds = None if scale is None else torch.zeros(scale.shape, dtype=dt, device=x.device)
        for piece, c0, c1 in _blocks(inp):
            u, xs = _raw_scores(x, weight, inp, piece, c0, c1, dt)
            gamma = _gamma(scale, inp, piece, c0, c1, dt)
            norm = stats["norm"][:, piece.col:piece.col + 1] if "norm" in stats else None
            y = _logits(u, bias, gamma, None if norm is None else norm[:, 0], inp, c0, c1, dt)
            z = _targets(inp, stats, piece, c0, c1, B, dt, x.device)
            q = _dl_dy(y, z, stats, mass, inp, piece) * g
            if gamma is None:
                du = q / T
            else:
                du = q * gamma / (norm * T) - u / norm ** 2 * (stats["c"][:, piece.col:piece.col + 1] * g)
                dgamma = (q * u / (norm * T)).sum(dim=0)
                if inp.scale_per_segment:
                    ds[piece.g] += dgamma.sum()
                else:
                    ds[c0 - lo:c1 - lo] += dgamma
            if db is not None:
                db[c0 - lo:c1 - lo] += q.sum(dim=0) / T
            wb = weight[c0 - lo:c1 - lo].to(dt)
            if x.dim() == 3:
                dx[:, piece.g] += du @ wb
            else:
                dx += du @ wb
            dw[c0 - lo:c1 - lo] += du.t() @ xs.to(dt)

        def cast(d, like):
            return None if d is None or like is None else d.to(like.dtype)

        return cast(dx, x), cast(dw, weight), cast(db, bias), cast(ds, scale), None


# ------------------------------------------------------------------------------------------------------ op

def _check(x, weight, bias, lo, hi, V, bounds, target_index, target_value, teacher_logits, scale, mode):
    if not (0 <= lo < hi <= V):
        _fail("class_range", f"({lo}, {hi}) is not a non-empty range inside [0, {V})")
    if weight.dim() != 2 or weight.shape[0] != hi - lo:
        _fail("weight_shard", f"must be [{hi - lo}, H] for class_range ({lo}, {hi}), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (hi - lo,):
        _fail("bias_shard", f"must be [{hi - lo}], got {tuple(bias.shape)}")
    if bounds[0] != 0 or bounds[-1] != V or any(a >= b for a, b in zip(bounds, bounds[1:])):
        _fail("segments", f"must increase strictly from 0 to num_classes={V}")
    if x.dim() == 3 and x.shape[1] != len(bounds) - 1:
        _fail("x", f"grouped x has {x.shape[1]} groups but there are {len(bounds) - 1} segments")
    if mode not in ("sigmoid", "softmax"):
        _fail("mode", f"must be 'sigmoid' or 'softmax', got {mode!r}")
    if (target_index is None) == (teacher_logits is None):
        _fail("target_index", "give either target_index/target_value (global class ids) or teacher_logits (shard)")
    if target_index is not None and (target_value is None or target_value.shape != target_index.shape):
        _fail("target_value", "must be given with target_index, of the same shape")
    if teacher_logits is not None and tuple(teacher_logits.shape) != (x.shape[0], hi - lo):
        _fail("teacher_logits", f"must be the shard's [{x.shape[0]}, {hi - lo}], got {tuple(teacher_logits.shape)}")
    if scale is not None and scale.numel() not in (len(bounds) - 1, hi - lo):
        _fail("scale", f"must be per segment [{len(bounds) - 1}] or the shard's per class [{hi - lo}]")


def _fused_part(x, weight, bias, scale, plan, scale_per_segment, kw, backend, memory_budget):
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


def _block_columns(B: int, memory_budget: Optional[int]) -> int:
    return max(1, (memory_budget or _BLOCK_BUDGET) // (_BLOCK_TEMPS * 8 * max(B, 1)))


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
        x = _GatherRows.apply(x, _check_rows(x_rows, x, group), group)
    lo, hi = (int(v) for v in class_range)
    V = int(num_classes)
    bounds = [0, V] if segments is None else _bounds_of(segments)[1]
    _check(x, weight_shard, bias_shard, lo, hi, V, bounds, target_index, target_value, teacher_logits, scale, mode)
    if reduction not in ("none", "sum", "mean"):
        _fail("reduction", f"must be 'none', 'sum' or 'mean', got {reduction!r}")
    ranges = _gather_ranges(lo, hi, x.device, group)
    if ranges[0][0] != 0 or ranges[-1][1] != V or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        _fail("class_range", f"the ranks' ranges {ranges} do not tile [0, {V}) in rank order")
    if scale_kind not in (None, "segment", "class"):
        _fail("scale_kind", f"must be None, 'segment' or 'class', got {scale_kind!r}")
    if scale is not None and scale_kind is not None:
        want = len(bounds) - 1 if scale_kind == "segment" else hi - lo
        if scale.numel() != want:
            _fail("scale", f"scale_kind={scale_kind!r} needs {want} values, got {scale.numel()}")
    scale_per_segment = scale is not None and (scale.numel() == len(bounds) - 1 if scale_kind is None
                                               else scale_kind == "segment")
    plan = _make_plan(lo, hi, bounds, ranges, needs_stats=mode == "softmax" or scale is not None)

    x_all = x if x_rows is not None else _CopyToRanks.apply(x, group, "grad_x")  # gathered rows: dx is scattered
    scale_all = _CopyToRanks.apply(scale, group, "grad_scale") if scale_per_segment else scale
    kw = dict(target_index=target_index, target_value=target_value, teacher_logits=teacher_logits, mode=mode,
              temperature=float(temperature))
    parts = []
    if plan.fused is not None:
        parts.append(_fused_part(x_all, weight_shard, bias_shard, scale_all, plan, scale_per_segment, kw, backend,
                                 memory_budget))
    if plan.num_split:  # every rank joins the statistics' collectives, with or without pieces of its own
        inp = _PieceInputs(plan=plan, block=_block_columns(x.shape[0], memory_budget), scale_per_segment=
                           scale_per_segment, group=group, **kw)
        parts.append(_SplitSegments.apply(x_all, weight_shard, bias_shard, scale_all, inp))
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    per_row = sum(p.to(dt) for p in parts)
    per_row = _SumOverRanks.apply(per_row, group)
    if sample_weight is not None:
        per_row = per_row * sample_weight.to(dt)
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.sum() / per_row.shape[0]


# ------------------------------------------------------------------------------------------ sampled softmax

class _SumOverRanksNamed(torch.autograd.Function):
    """``_SumOverRanks`` under another name in the communication log."""

    @staticmethod
    def forward(ctx, t, group, name):
        return _all_reduce(name, t.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _shared_candidates(num_sampled: int, num_classes: int, sampler: str, unique: bool, class_counts, distortion,
                       generator, device, group):
    """Rank 0 draws the candidates; the ids and the try count are broadcast, so every rank holds the same ones."""
    from kc_kernels import samplers

    src = dist.get_global_rank(group, 0) if group is not None and _world(group) > 1 else 0
    rank = dist.get_rank(group) if _world(group) > 1 else 0
    cand = None
    if rank == 0:
        cand = samplers.sample_candidates(sampler, num_sampled, num_classes, unique=unique, class_counts=class_counts,
                                          distortion=distortion, generator=generator)
        packed = torch.cat([torch.tensor([cand.num_tries]), cand.ids.long()])
    else:
        packed = torch.empty(num_sampled + 1, dtype=torch.long)
    packed = packed.to(device)
    _record("sampled_ids", packed)
    if _world(group) > 1:
        dist.broadcast(packed, src, group=group)
    if cand is None:
        probs = (samplers.class_probabilities(sampler, num_classes, class_counts=class_counts, distortion=distortion)
                 if sampler == "unigram" else None)
        cand = samplers.Candidates(packed[1:].cpu(), int(packed[0]), probs, sampler, num_classes)
    return cand


def vocab_parallel_sampled_softmax_loss(
        x: torch.Tensor, weight_shard: torch.Tensor, bias_shard: Optional[torch.Tensor], labels: torch.Tensor, *,
        class_range: Tuple[int, int], num_classes: int, num_sampled: Optional[int] = None,
        sampler: str = "log_uniform", class_counts: Optional[torch.Tensor] = None, distortion: float = 1.0,
        unique: bool = True, remove_accidental_hits: bool = True, subtract_log_q: bool = True,
        generator: Optional[torch.Generator] = None, sampled=None, sample_weight: Optional[torch.Tensor] = None,
        reduction: str = "mean", group=None) -> torch.Tensor:
    """``sampled_softmax_loss`` with the classes sharded over the ranks of ``group`` (TensorFlow's semantics).

    This rank holds classes ``class_range = (lo, hi)``: ``weight_shard`` [hi - lo, H], ``bias_shard``. Replicated:
    x [B, H], ``labels`` [B] or [B, T] (global ids, -1 pads), ``sample_weight``, ``class_counts`` [V] (unigram).
    The S negatives are shared by the ranks: drawn by rank 0 with its ``generator`` and broadcast (S + 1 int64),
    or given as ``sampled=(ids, true_expected, sampled_expected)``, which must then be the same on every rank.
    Each rank scores the true labels and the negatives it owns ([B, T + S_r] logits, S_r about S / W); the
    softmax's log-sum-exp is merged across ranks (an all-reduce of the row maxima, then of [B, 2]: the sum of
    exponentials and the true labels' target-weighted logits). Backward all-reduces dx; weight and bias gradients
    stay on the shard (dense). Returns the global loss, the same on every rank.
    """
    from kc_kernels.ops import checks

    lo, hi = (int(v) for v in class_range)
    V = int(num_classes)
    checks.tensor("x", x, dims=(2,), floating=True)
    if not (0 <= lo < hi <= V):
        _fail("class_range", f"({lo}, {hi}) is not a non-empty range inside [0, {V})")
    if weight_shard.dim() != 2 or tuple(weight_shard.shape) != (hi - lo, x.shape[1]):
        _fail("weight_shard", f"must be [{hi - lo}, {x.shape[1]}] for class_range ({lo}, {hi}), got "
                              f"{tuple(weight_shard.shape)}")
    if bias_shard is not None and tuple(bias_shard.shape) != (hi - lo,):
        _fail("bias_shard", f"must be [{hi - lo}], got {tuple(bias_shard.shape)}")
    checks.tensor("labels", labels, dims=(1, 2), integer=True)
    if labels.shape[0] != x.shape[0]:
        _fail("labels", f"has {labels.shape[0]} rows but x has {x.shape[0]}")
    checks.index_range("labels", labels, V)
    labels2 = (labels if labels.dim() == 2 else labels[:, None]).long()
    valid = labels2 >= 0
    if labels2.numel() and bool((valid.sum(dim=1) == 0).any()):
        _fail("labels", "every row needs at least one label (a row is all -1 padding)")
    if reduction not in ("none", "sum", "mean"):
        _fail("reduction", f"must be 'none', 'sum' or 'mean', got {reduction!r}")
    if sample_weight is not None and tuple(sample_weight.shape) != (x.shape[0],):
        _fail("sample_weight", f"must be [{x.shape[0]}], got {tuple(sample_weight.shape)}")
    ranges = _gather_ranges(lo, hi, x.device, group)
    if ranges[0][0] != 0 or ranges[-1][1] != V or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        _fail("class_range", f"the ranks' ranges {ranges} do not tile [0, {V}) in rank order")
    if sampled is None:
        if num_sampled is None or isinstance(num_sampled, bool) or int(num_sampled) != num_sampled \
                or num_sampled < 1:
            _fail("num_sampled", f"must be a positive integer, got {num_sampled!r}")
        if unique and num_sampled > V:
            _fail("num_sampled", f"{num_sampled} exceeds the {V} classes (unique sampling)")
        cc = None if class_counts is None else class_counts.cpu()
        if sampler == "unigram" and cc is None:
            _fail("class_counts", "the unigram sampler needs class_counts [V]")
        cand = _shared_candidates(int(num_sampled), V, sampler, unique, cc, distortion, generator, x.device, group)
        ids = cand.ids.to(x.device)
        true_expected = cand.expected_count(labels2.cpu(), int(num_sampled), unique).to(x.device)
        sampled_expected = cand.expected_count(cand.ids, int(num_sampled), unique).to(x.device)
        if subtract_log_q and bool(((true_expected <= 0) & valid).any()):
            _fail("labels", "hold a class that the unigram sampler can never draw (class_counts 0)")
    else:
        if not isinstance(sampled, (tuple, list)) or len(sampled) != 3:
            _fail("sampled", "expected a tuple (ids [S], true_expected, sampled_expected [S])")
        ids, true_expected, sampled_expected = sampled
        if ids.dim() != 1 or tuple(sampled_expected.shape) != tuple(ids.shape):
            _fail("sampled", "ids and sampled_expected must both be [S]")
        if tuple(true_expected.shape) != tuple(labels.shape):
            _fail("sampled", f"true_expected has shape {tuple(true_expected.shape)}, labels {tuple(labels.shape)}")
        checks.index_range("sampled", ids, V, allow_padding=False)
        ids = ids.long()
        true_expected = true_expected.reshape(labels2.shape)

    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_all = _CopyToRanks.apply(x, group, "grad_x").to(dt)
    w = weight_shard.to(dt)
    b = None if bias_shard is None else bias_shard.to(dt)
    neg_inf = torch.tensor(-math.inf, dtype=dt, device=x.device)
    # the true labels this rank owns
    mine_t = valid & (labels2 >= lo) & (labels2 < hi)
    local_t = torch.where(mine_t, labels2 - lo, 0)
    true_logits = torch.einsum("bh,bth->bt", x_all, w[local_t])
    if b is not None:
        true_logits = true_logits + b[local_t]
    if subtract_log_q:
        true_logits = true_logits - torch.log(torch.where(valid, true_expected.to(dt), 1.0))
    true_logits = torch.where(mine_t, true_logits, neg_inf)
    # the negatives this rank owns
    own = (ids >= lo) & (ids < hi)
    my_ids = ids[own]
    samp_logits = x_all @ w[my_ids - lo].t()
    if b is not None:
        samp_logits = samp_logits + b[my_ids - lo]
    if subtract_log_q:
        samp_logits = samp_logits - torch.log(sampled_expected[own].to(dt))
    if remove_accidental_hits:
        hit = ((labels2[:, :, None] == my_ids[None, None, :]) & valid[:, :, None]).any(dim=1)
        samp_logits = torch.where(hit, neg_inf, samp_logits)
    logits = torch.cat([true_logits, samp_logits], dim=1)
    local_max = logits.detach().max(dim=1).values if logits.shape[1] else torch.full_like(x_all[:, 0], -math.inf)
    row_max = _all_reduce("max", local_max.detach().clone(), group, op=dist.ReduceOp.MAX)
    target = valid.to(dt) / valid.sum(dim=1, keepdim=True).to(dt)
    picked = (target * torch.where(mine_t, true_logits, torch.zeros((), dtype=dt, device=x.device))).sum(dim=1)
    sum_exp = torch.exp(logits - row_max[:, None]).sum(dim=1)
    both = _SumOverRanksNamed.apply(torch.stack([sum_exp, picked], dim=1), group, "sum_exp_and_true")
    per_row = row_max + torch.log(both[:, 0]) - both[:, 1]
    if sample_weight is not None:
        per_row = per_row * sample_weight.to(dt)
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.sum() / per_row.shape[0]


# ------------------------------------------------------------------------------------------ communication

def communication_bytes(batch: int, hidden: int, num_classes: int, world_size: int, *, segments=None,
                        class_ranges: Optional[List[Tuple[int, int]]] = None, mode: str = "sigmoid",
                        scale: Optional[str] = None, dense_teacher: bool = False, grouped: bool = False,
                        dtype: torch.dtype = torch.float32, x_rows: Optional[Sequence[int]] = None
                        ) -> Dict[str, int]:
    """Bytes of every collective of one forward + backward step, per rank (numel x element size of the tensor
    reduced or gathered; a ring all-reduce moves about 2 (W - 1) / W times that over each rank's link, a ring
    all-gather or reduce-scatter (W - 1) / W times).

    ``scale``: None, "segment" or "class"; ``class_ranges`` defaults to ``shard_classes(segments, W)``;
    ``x_rows``: x sharded by rows (the op's argument): x is all-gathered and dx reduce-scattered, both padded to
    the largest share. Also returns ``logits_avoided``: the [B, V] logits and their gradient in ``dtype`` that
    the op never holds.
    """
    bounds = [0, num_classes] if segments is None else _bounds_of(segments)[1]
    ranges = class_ranges or shard_classes(bounds if segments is not None else num_classes, world_size)
    G = len(bounds) - 1
    S = len(split_segments(bounds, ranges)) if (mode == "softmax" or scale) else 0
    stat = 8 if dtype == torch.float64 else 4
    elem = torch.empty((), dtype=dtype).element_size()
    out = {"class_ranges": world_size * 2 * 8}
    if S and scale:
        out["sum_of_squares"] = batch * S * stat
    if S and mode == "softmax":
        width = 2 * S if dense_teacher else S
        out["max"] = batch * width * stat
        out["sum_exp"] = batch * width * stat
    if S and scale:
        out["scale_term"] = batch * S * stat
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
