"""The portable (linear +) soft-target loss: plain PyTorch over class chunks, for any device where no kernel runs.

The classes are walked in chunks of ``chunk`` columns; a chunk's scores u, logits y and targets z are [B, chunk]
and are dropped before the next chunk, so memory is O(B * H + V * H + B * chunk) and no [B, V] tensor exists
(beyond the given logits of ``soft_target_loss``). Each loss mode is its per-element terms in ``TERMS``; autograd
derives every gradient from them, chunk by chunk, with the chunk recomputed in backward, so no gradient is written
out by hand here.

The row statistics that couple a segment's classes (its sum of u^2 under the self-paced scale, its log-sum-exp in
softmax mode) are sums over classes into columns of a [B, width] tensor, one column per segment, passed through a
``reduce`` hook once complete, and their gradients through it again in backward. In one process the hook does
nothing. The vocab-parallel op (kc_kernels.distributed) walks only the pieces of the segments cut by its shards,
with one column per cut segment, and all-reduces them across ranks: the same formula serves both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from kc_kernels import reference

__all__ = ["TERMS", "Terms", "Piece", "no_reduce", "soft_target_rows", "linear_soft_target_loss",
           "soft_target_loss"]

NORM_EPS = 1e-12  # added to the segment's sum of squares under the self-paced scale (kc_kernels/reference.py)
DEFAULT_MEMORY_BUDGET = 64 << 20  # bytes of [B, chunk] temporaries
_TEMPS = 8  # [B, chunk] temporaries alive at once in a chunk's backward (u, y, z, exp, the loss terms, gradients)


@dataclass(frozen=True)
class Terms:
    """One loss mode's math: ``loss(y, z, lse)`` per element (summed over a row's classes, times T^power),
    ``target(t, t_lse)`` the dense teacher's target from its logits t / T (and, where ``segment_lse``, its
    segment's log-sum-exp), and whether the loss reads each segment's log-sum-exp of y (``lse``)."""

    loss: Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
    target: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
    segment_lse: bool
    temperature_power: int


TERMS = {
    # binary cross-entropy summed over classes
    "sigmoid": Terms(loss=lambda y, z, lse: F.softplus(y) - z * y,
                     target=lambda t, t_lse: torch.sigmoid(t), segment_lse=False, temperature_power=0),
    # cross-entropy against soft targets per segment: sum_j z_j (lse - y_j) = m lse - sum_j z_j y_j
    "softmax": Terms(loss=lambda y, z, lse: z * (lse - y),
                     target=lambda t, t_lse: torch.exp(t - t_lse), segment_lse=True, temperature_power=2),
}


@dataclass(frozen=True)
class Piece:
    """Classes [c0, c1) of ``weight`` (or of the logits' columns), all of one segment: ``segment`` is its index
    into a per-segment scale and into grouped x, ``column`` its column of the row statistics."""

    c0: int
    c1: int
    segment: int
    column: int


Reduce = Callable[[str, torch.Tensor, str], torch.Tensor]


def no_reduce(name: str, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The ``reduce`` hook of one process: the local statistics are the whole ones."""
    return t


@dataclass(frozen=True)
class _Chunk:
    a: int
    b: int
    pieces: Tuple[Tuple[int, int, int], ...]  # (c0, c1, segment) inside [a, b)
    columns: torch.Tensor  # [b - a] statistics column of each class
    segments: torch.Tensor  # [b - a] segment of each class


def _chunks(pieces: Sequence[Piece], chunk: int, device) -> List[_Chunk]:
    """Runs of adjacent pieces cut every ``chunk`` classes (a chunk may span segments: one GEMM for all of them
    unless x is grouped)."""
    runs: List[List[Piece]] = []
    for p in sorted(pieces, key=lambda p: p.c0):
        if runs and runs[-1][-1].c1 == p.c0:
            runs[-1].append(p)
        else:
            runs.append([p])
    out = []
    for run in runs:
        for a in range(run[0].c0, run[-1].c1, chunk):
            b = min(a + chunk, run[-1].c1)
            inside = [(max(p.c0, a), min(p.c1, b), p) for p in run if p.c0 < b and p.c1 > a]
            cols = torch.cat([torch.full((c1 - c0,), p.column, dtype=torch.long) for c0, c1, p in inside])
            segs = torch.cat([torch.full((c1 - c0,), p.segment, dtype=torch.long) for c0, c1, p in inside])
            out.append(_Chunk(a, b, tuple((c0, c1, p.segment) for c0, c1, p in inside), cols.to(device),
                              segs.to(device)))
    return out


@dataclass
class _Stats:
    """The reduced row statistics [B, width]: the sums of u^2 and of exp(y - max), the max, the teacher's lse."""

    sum_sq: Optional[torch.Tensor] = None
    sum_exp: Optional[torch.Tensor] = None
    max: Optional[torch.Tensor] = None
    teacher_lse: Optional[torch.Tensor] = None

    def norm(self, sum_sq=None):
        s = self.sum_sq if sum_sq is None else sum_sq
        return None if s is None else torch.sqrt(s + NORM_EPS)

    def lse(self, sum_exp=None):
        s = self.sum_exp if sum_exp is None else sum_exp
        return None if s is None else self.max + torch.log(s)


@dataclass
class _Walk:
    """Everything a walk reads besides the differentiable tensors (x, weight, bias, scale, logits)."""

    terms: Terms
    temperature: float
    chunks: List[_Chunk]
    width: int
    dtype: torch.dtype  # compute dtype: fp64 stays fp64, else fp32
    target_index: Optional[torch.Tensor]
    target_value: Optional[torch.Tensor]
    target_offset: int  # target_index holds class c + target_offset for class c of weight
    teacher_logits: Optional[torch.Tensor]  # [B, columns of weight]
    scale_per_segment: bool
    reduce: Reduce

    # ------------------------------------------------------------------------------ one chunk's math
    def scores(self, c: _Chunk, x, weight, logits) -> torch.Tensor:
        dt = self.dtype
        if logits is not None:
            return logits.to(dt)
        w = weight.to(dt)
        if torch.is_tensor(x):
            return x.to(dt) @ w.t()
        # grouped: x is a {segment: [B, H]} of this chunk's groups
        return torch.cat([x[s].to(dt) @ w[c0 - c.a:c1 - c.a].t() for c0, c1, s in c.pieces], dim=1)

    def logits(self, c: _Chunk, u, bias, scale, norm) -> torch.Tensor:
        y = u
        if scale is not None:
            gamma = scale.to(self.dtype)
            gamma = gamma[c.segments] if self.scale_per_segment else gamma
            y = gamma * u / norm[:, c.columns]
        if bias is not None:
            y = y + bias.to(self.dtype)  # a class prior: never normalised together with x.w
        return y / self.temperature

    def targets(self, c: _Chunk, B: int, device, teacher_lse) -> torch.Tensor:
        dt = self.dtype
        if self.teacher_logits is not None:
            t = self.teacher_logits[:, c.a:c.b].to(dt) / self.temperature
            return self.terms.target(t, None if teacher_lse is None else teacher_lse[:, c.columns])
        idx = self.target_index - (c.a + self.target_offset)
        inside = (idx >= 0) & (idx < c.b - c.a)  # padding (-1) and other shards' classes fall outside
        z = torch.zeros(B, c.b - c.a, dtype=dt, device=device)
        zero = torch.zeros((), dtype=dt, device=device)
        return z.scatter_add(1, torch.where(inside, idx, 0).long(),
                             torch.where(inside, self.target_value.to(dt), zero))  # duplicates add up

    def column_sum(self, c: _Chunk, v: torch.Tensor) -> torch.Tensor:
        """[B, chunk] -> [B, width]: each row's sum over the classes of each statistics column."""
        return v.new_zeros(v.shape[0], self.width).index_add(1, c.columns, v)

    def objective(self, c: _Chunk, u, bias, scale, stats: _Stats, norm, lse, grad_rows,
                  grad_sum_exp=None, grad_sum_sq=None) -> torch.Tensor:
        """sum_b grad_rows[b] * loss_b of the chunk's classes, plus the statistics' contributions weighted by the
        gradients with respect to them (the vector-Jacobian product a chunk adds in backward)."""
        y = self.logits(c, u, bias, scale, norm)
        z = self.targets(c, u.shape[0], u.device, stats.teacher_lse)
        terms = self.terms.loss(y, z, None if lse is None else lse[:, c.columns])
        out = (grad_rows[:, None] * terms).sum() * self.temperature ** self.terms.temperature_power
        if grad_sum_exp is not None:
            out = out + (grad_sum_exp[:, c.columns] * torch.exp(y - stats.max[:, c.columns])).sum()
        if grad_sum_sq is not None:
            out = out + (grad_sum_sq[:, c.columns] * u * u).sum()
        return out

    # ------------------------------------------------------------------------------ forward passes
    def inputs(self, c: _Chunk, x, weight, bias, scale, logits):
        """The chunk's part of the differentiable inputs: x (grouped: {segment: x[:, segment]}), weight, bias,
        scale (whole when per segment) and logits."""
        xs = None
        if x is not None:
            xs = x if x.dim() == 2 else {s: x[:, s] for _, _, s in c.pieces}
        return (xs, None if weight is None else weight[c.a:c.b], None if bias is None else bias[c.a:c.b],
                scale if scale is None or self.scale_per_segment else scale[c.a:c.b],
                None if logits is None else logits[:, c.a:c.b])

    def statistics(self, x, weight, bias, scale, logits, B: int, device) -> _Stats:
        dt, W = self.dtype, self.width
        stats = _Stats()
        if scale is not None:
            sq = torch.zeros(B, W, dtype=dt, device=device)
            for c in self.chunks:
                xs, w, _, _, lg = self.inputs(c, x, weight, bias, scale, logits)
                u = self.scores(c, xs, w, lg)
                sq += self.column_sum(c, u * u)
            stats.sum_sq = self.reduce("sum_of_squares", sq, "sum")
        if self.terms.segment_lse:
            self._log_sum_exp(stats, x, weight, bias, scale, logits, B, device)
        return stats

    def _log_sum_exp(self, stats: _Stats, x, weight, bias, scale, logits, B: int, device) -> None:
        """Each column's max and sum of exp(y - max) (and a dense teacher's, in columns W..2W), kept online over
        the chunks, then merged over the reduce: max first, then the sums rescaled to it."""
        dt, W = self.dtype, self.width
        dense = self.teacher_logits is not None
        width = 2 * W if dense else W
        mx = torch.full((B, width), -math.inf, dtype=dt, device=device)
        se = torch.zeros(B, width, dtype=dt, device=device)
        norm = stats.norm()

        def merge(cols, v):
            top = torch.full_like(mx, -math.inf).scatter_reduce(1, cols.expand(B, -1), v, "amax")
            new = torch.maximum(mx, top)
            keep = torch.where(torch.isinf(mx), torch.zeros_like(se), torch.exp(mx - new))  # 0, not 0 * nan
            se.mul_(keep).add_(se.new_zeros(B, width).index_add(1, cols, torch.exp(v - new[:, cols])))
            mx.copy_(new)

        for c in self.chunks:
            xs, w, b, s, lg = self.inputs(c, x, weight, bias, scale, logits)
            merge(c.columns, self.logits(c, self.scores(c, xs, w, lg), b, s, norm))
            if dense:
                merge(c.columns + W, self.teacher_logits[:, c.a:c.b].to(dt) / self.temperature)
        local = mx.clone()
        mx = self.reduce("max", mx, "max")
        # columns without a class here have max -inf and sum 0: their share stays 0 instead of 0 * exp(nan)
        share = torch.where(torch.isinf(local), torch.zeros_like(se), torch.exp(local - mx))
        se = self.reduce("sum_exp", se * share, "sum")
        stats.max, stats.sum_exp = mx[:, :W], se[:, :W]
        if dense:
            stats.teacher_lse = mx[:, W:] + torch.log(se[:, W:])

    def loss_rows(self, x, weight, bias, scale, logits, stats: _Stats, B: int, device) -> torch.Tensor:
        rows = torch.zeros(B, dtype=self.dtype, device=device)
        norm, lse = stats.norm(), stats.lse()
        for c in self.chunks:
            xs, w, b, s, lg = self.inputs(c, x, weight, bias, scale, logits)
            y = self.logits(c, self.scores(c, xs, w, lg), b, s, norm)
            z = self.targets(c, B, device, stats.teacher_lse)
            rows += self.terms.loss(y, z, None if lse is None else lse[:, c.columns]).sum(dim=1)
        return rows * self.temperature ** self.terms.temperature_power

    # ------------------------------------------------------------------------------ backward passes
    def statistic_grad(self, which: str, x, weight, bias, scale, logits, stats: _Stats, g, grad_sum_exp):
        """d(sum_b g_b l_b)/d(statistic) for ``which`` in ("sum_exp", "sum_sq"), the later statistic's gradient
        (grad_sum_exp) already known: one pass over the chunks, the statistic a leaf and the inputs constants."""
        total = getattr(stats, which)
        leaf = total.detach().requires_grad_(True)
        with torch.enable_grad():
            norm = stats.norm(leaf) if which == "sum_sq" else stats.norm()
            lse = stats.lse(leaf) if which == "sum_exp" else stats.lse()
            # the finalised statistic as its own leaf, so each chunk's graph ends there; chained to ``leaf`` once
            fin = norm if which == "sum_sq" else lse
            fin_leaf = fin.detach().requires_grad_(True)
            d_fin = torch.zeros_like(fin)
            for c in self.chunks:
                xs, w, b, s, lg = self.inputs(c, x, weight, bias, scale, logits)
                with torch.no_grad():
                    u = self.scores(c, xs, w, lg)
                obj = self.objective(c, u, b, s, stats,
                                     fin_leaf if which == "sum_sq" else norm,
                                     fin_leaf if which == "sum_exp" else lse, g,
                                     grad_sum_exp=grad_sum_exp if which == "sum_sq" else None)
                d_fin += torch.autograd.grad(obj, fin_leaf)[0]
            d = torch.autograd.grad(fin, leaf, d_fin)[0]
        return self.reduce("grad_" + ("sum_exp" if which == "sum_exp" else "sum_of_squares"), d, "sum")

    def input_grads(self, x, weight, bias, scale, logits, stats: _Stats, g, grad_sum_exp, grad_sum_sq, needs):
        """Gradients of sum_b g_b l_b with respect to x, weight, bias, scale, logits (None where not needed): one
        pass over the chunks, each chunk's slices leaves and the statistics constants (their dependence on the
        inputs is carried by grad_sum_exp and grad_sum_sq)."""
        dt = self.dtype
        grads = [None if t is None or not need else torch.zeros(t.shape, dtype=dt, device=t.device)
                 for t, need in zip((x, weight, bias, scale, logits), needs)]
        dx, dw, db, ds, dl = grads
        norm, lse = stats.norm(), stats.lse()
        scale_leaf = None
        if scale is not None and self.scale_per_segment:
            scale_leaf = scale.detach().requires_grad_(needs[3])
        for c in self.chunks:
            xs, w, b, s, lg = self.inputs(c, x, weight, bias, scale, logits)

            def leaf(t, need):
                return None if t is None else t.detach().requires_grad_(need)

            xs = None if xs is None else (leaf(xs, needs[0]) if torch.is_tensor(xs)
                                          else {k: leaf(v, needs[0]) for k, v in xs.items()})
            w, b, lg = leaf(w, needs[1]), leaf(b, needs[2]), leaf(lg, needs[4])
            s = scale_leaf if self.scale_per_segment else leaf(s, needs[3])
            with torch.enable_grad():
                u = self.scores(c, xs, w, lg)
                obj = self.objective(c, u, b, s, stats, norm, lse, g, grad_sum_exp, grad_sum_sq)
                wrt = {}
                if dx is not None:
                    wrt.update({("x", k): v for k, v in (xs.items() if isinstance(xs, dict) else [(None, xs)])})
                for name, t, d in (("w", w, dw), ("b", b, db), ("s", s, ds), ("l", lg, dl)):
                    if d is not None and t is not None:
                        wrt[name] = t
                if not wrt:
                    continue
                got = dict(zip(wrt, torch.autograd.grad(obj, list(wrt.values()), allow_unused=True)))
            for key, d in got.items():
                if d is None:
                    continue
                if key == "w":
                    dw[c.a:c.b] += d
                elif key == "b":
                    db[c.a:c.b] += d
                elif key == "l":
                    dl[:, c.a:c.b] += d
                elif key == "s":
                    if self.scale_per_segment:
                        ds += d
                    else:
                        ds[c.a:c.b] += d
                elif key[1] is None:
                    dx += d
                else:
                    dx[:, key[1]] += d
        return grads


class _SoftTargetRows(torch.autograd.Function):
    """Per-row loss of a walk; backward is reverse mode over the walk's statistics (the last computed first),
    then over the inputs, each a pass over the chunks with autograd on the chunk's recomputed math."""

    @staticmethod
    def forward(ctx, walk: _Walk, x, weight, bias, scale, logits):
        src = x if x is not None else logits
        B = src.shape[0]
        stats = walk.statistics(x, weight, bias, scale, logits, B, src.device)
        rows = walk.loss_rows(x, weight, bias, scale, logits, stats, B, src.device)
        ctx.walk, ctx.stats = walk, stats
        ctx.save_for_backward(x, weight, bias, scale, logits)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        walk, stats = ctx.walk, ctx.stats
        x, weight, bias, scale, logits = (None if t is None else t.detach() for t in ctx.saved_tensors)
        g = grad_rows.to(walk.dtype)
        # every rank runs the same passes and reduces, whatever it holds (the reduces are collectives)
        grad_sum_exp = grad_sum_sq = None
        if stats.sum_exp is not None:
            grad_sum_exp = walk.statistic_grad("sum_exp", x, weight, bias, scale, logits, stats, g, None)
        if stats.sum_sq is not None:
            grad_sum_sq = walk.statistic_grad("sum_sq", x, weight, bias, scale, logits, stats, g, grad_sum_exp)
        needs = ctx.needs_input_grad[1:]
        grads = walk.input_grads(x, weight, bias, scale, logits, stats, g, grad_sum_exp, grad_sum_sq, needs)
        out = [None if d is None else d.to(t.dtype) for d, t in zip(grads, (x, weight, bias, scale, logits))]
        return (None, *out)


def chunk_columns(batch: int, dtype: torch.dtype, memory_budget: Optional[int]) -> int:
    """Classes per chunk such that the chunk's [B, chunk] temporaries fit ``memory_budget`` bytes."""
    elem = 8 if dtype == torch.float64 else 4
    return max(1, (memory_budget or DEFAULT_MEMORY_BUDGET) // (_TEMPS * elem * max(batch, 1)))


def soft_target_rows(x: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     scale: Optional[torch.Tensor], *, pieces: Sequence[Piece], width: int, mode: str,
                     temperature: float = 1.0, target_index=None, target_value=None, target_offset: int = 0,
                     teacher_logits=None, scale_per_segment: bool = False, chunk: int,
                     logits: Optional[torch.Tensor] = None, reduce: Reduce = no_reduce) -> torch.Tensor:
    """Per-row loss [B] of the classes in ``pieces`` (differentiable in x, weight, bias, scale and logits).

    Raw scores come from ``x`` [B, H] (grouped [B, G, H]: a piece reads ``x[:, piece.segment]``) and ``weight``
    [C, H], or are the given ``logits`` [B, C]. ``bias`` [C], ``scale`` per class [C] or, with
    ``scale_per_segment``, indexed by ``piece.segment``. Targets: ``target_index`` holds class ids offset by
    ``target_offset`` (-1 pads); ``teacher_logits`` [B, C]. Statistics have ``width`` columns (``piece.column``);
    ``reduce(name, t, op)`` ("sum" or "max") completes them, and the gradients of the sums in backward.
    Returns fp32 (fp64 for fp64 inputs).
    """
    src = x if x is not None else logits
    dt = torch.float64 if src.dtype == torch.float64 else torch.float32
    walk = _Walk(terms=TERMS[mode], temperature=float(temperature), chunks=_chunks(pieces, chunk, src.device),
                 width=width, dtype=dt, target_index=target_index, target_value=target_value,
                 target_offset=target_offset, teacher_logits=teacher_logits, scale_per_segment=scale_per_segment,
                 reduce=reduce)
    return _SoftTargetRows.apply(walk, x, weight, bias, scale, logits)


# ------------------------------------------------------------------------------------------ backend entry points

def _segment_pieces(bounds: Sequence[int]) -> List[Piece]:
    return [Piece(bounds[g], bounds[g + 1], g, g) for g in range(len(bounds) - 1)]


def _rows(p, x, weight, bias, logits) -> torch.Tensor:
    src = x if x is not None else logits
    rows = soft_target_rows(
        x, weight, bias, p.scale, logits=logits, pieces=_segment_pieces(p.bounds), width=p.num_segments,
        mode=p.mode, temperature=p.temperature, target_index=p.target_index, target_value=p.target_value,
        teacher_logits=p.teacher_logits, scale_per_segment=p.scale is not None and not p.scale_per_class,
        chunk=chunk_columns(p.batch, src.dtype, p.memory_budget))
    return reference.reduce_loss(rows, p.sample_weight, p.reduction)


def linear_soft_target_loss(p) -> torch.Tensor:
    """The ``portable`` backend of linear_soft_target_loss, on a validated problem (kc_kernels.ops)."""
    return _rows(p, p.x, p.weight, p.bias, None)


def soft_target_loss(p) -> torch.Tensor:
    """The ``portable`` backend of soft_target_loss (given raw scores; no bias)."""
    return _rows(p, None, None, None, p.logits)
