"""The portable (linear +) soft-target loss: plain PyTorch over class chunks, for any device where no kernel runs.

The classes are walked in chunks of ``chunk`` columns; a chunk's scores u, logits y and targets z are [B, chunk]
and are dropped before the next chunk, so memory is O(B * H + V * H + B * chunk) and no [B, V] tensor exists
(beyond the given logits of ``soft_target_loss`` and a given dense teacher). A teacher head's logits are one GEMM
per chunk, made again in each pass that reads them. Each loss mode is its per-element terms in ``TERMS``, given a
segment's log-sum-exp lse of y and the teacher's target (z, or log z for reverse_kl and jsd); autograd derives
every gradient from them, chunk by chunk, with the chunk recomputed in backward, so no gradient is written out by
hand here.

The row statistics that couple a segment's classes (its sum of u^2 under the self-paced scale; its log-sum-exp
in the softmax-family modes, with a dense teacher's beside it; a top-K teacher's mass and count of classes outside
the top K under reverse_kl and jsd) are sums over classes into columns of [B, width] tensors, one column per
segment, passed through a ``reduce`` hook once complete, and the gradients of the log-sum-exp and the sum of
squares through it again in backward. Everything else is per element (the z-loss too, spread over the segment's
classes), so a segment's loss is the sum of its pieces' losses once the statistics are whole. In one process the
hook does nothing. The vocab-parallel op (kc_kernels.distributed) walks only the pieces of the segments cut by its
shards, with one column per cut segment, and all-reduces them across ranks: the same formula serves both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from kc_kernels import reference
from kc_kernels.layout import NORM_EPS  # added to a segment's sum of squares under a scale
from kc_kernels.loss_modes import LossMode
from kc_kernels.reduction import compute_dtype

__all__ = ["TERMS", "Terms", "Piece", "no_reduce", "soft_target_rows", "linear_soft_target_loss",
           "soft_target_loss"]

DEFAULT_MEMORY_BUDGET = 16 << 20  # bytes of [B, chunk] temporaries (small enough to stay near the cache)
_TEMPS = 8  # [B, chunk] temporaries alive at once in a chunk's backward (u, y, z, exp, the loss terms, gradients)


@dataclass(frozen=True)
class Terms:
    """One loss mode's math: ``loss(y, z, lse, beta)`` per element (summed over a row's classes, times
    T^power), ``target(t, t_lse)`` the dense teacher's target from its logits t / T (and, where ``segment_lse``,
    its segment's log-sum-exp), and whether the loss reads each segment's log-sum-exp of y (``lse``). With
    ``log_target`` the targets are the teacher's log-probabilities log z (reference.teacher_log_probs: sparse
    targets get the tail mass outside the top K), else its probabilities z (sparse targets as given)."""

    loss: Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], float], torch.Tensor]
    target: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
    segment_lse: bool
    temperature_power: int
    log_target: bool = False
    temporaries: int = _TEMPS  # [B, chunk] temporaries alive at once in a chunk's backward


def _xlogx(z: torch.Tensor) -> torch.Tensor:
    """z log z with 0 log 0 = 0."""
    pos = z > 0
    return torch.where(pos, z * torch.log(torch.where(pos, z, torch.ones_like(z))), torch.zeros_like(z))


def _reverse_kl(y, lz, lse, beta):
    """p (log p - log z), p = exp(y - lse)."""
    lp = y - lse
    return torch.exp(lp) * (lp - lz)


def _jsd(y, lz, lse, beta):
    """beta z (log z - log M) + (1 - beta) p (log p - log M), M = beta z + (1 - beta) p (a term whose
    probability is 0 is 0)."""
    lp = y - lse
    p, z = torch.exp(lp), torch.exp(lz)
    lm = torch.logaddexp(lz + math.log(beta), lp + math.log(1 - beta))
    t_part = torch.where(z > 0, z * (lz - lm), torch.zeros_like(z))
    s_part = torch.where(p > 0, p * (lp - lm), torch.zeros_like(p))
    return beta * t_part + (1 - beta) * s_part


def _softmax_target(t, t_lse):
    return torch.exp(t - t_lse)


TERMS = {  # by kc_kernels.loss_modes.LossMode
    # binary cross-entropy summed over classes
    LossMode.SIGMOID: Terms(loss=lambda y, z, lse, beta: F.softplus(y) - z * y,
                            target=lambda t, t_lse: torch.sigmoid(t), segment_lse=False, temperature_power=0),
    # cross-entropy against soft targets per segment: sum_j z_j (lse - y_j) = m lse - sum_j z_j y_j
    LossMode.SOFTMAX: Terms(loss=lambda y, z, lse, beta: z * (lse - y), target=_softmax_target, segment_lse=True,
                            temperature_power=2),
    # KL(z || p): the cross-entropy plus z log z (sparse targets: of the summed duplicates)
    LossMode.KL: Terms(loss=lambda y, z, lse, beta: z * (lse - y) + _xlogx(z), target=_softmax_target,
                       segment_lse=True, temperature_power=2, temporaries=10),
    # KL(p || z)
    LossMode.REVERSE_KL: Terms(loss=_reverse_kl, target=lambda t, t_lse: t - t_lse, segment_lse=True,
                               temperature_power=2, log_target=True, temporaries=10),
    # generalized Jensen-Shannon divergence with weight beta
    LossMode.JSD: Terms(loss=_jsd, target=lambda t, t_lse: t - t_lse, segment_lse=True, temperature_power=2,
                        log_target=True, temporaries=20),
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
Result = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]  # the loss, or (loss, lse [B, G]) on request


def no_reduce(name: str, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The ``reduce`` hook of one process: the local statistics are the whole ones."""
    return t


@dataclass(frozen=True)
class _Chunk:
    a: int
    b: int
    pieces: Tuple[Tuple[int, int, int, int], ...]  # (c0, c1, segment, column) inside [a, b)
    columns: torch.Tensor  # [b - a] statistics column of each class
    segments: torch.Tensor  # [b - a] segment of each class

    def per_class(self, stat: torch.Tensor) -> torch.Tensor:
        """A [B, width] row statistic read per class, [B, b - a]; a chunk inside one segment broadcasts its
        column instead of gathering it."""
        if len(self.pieces) == 1:
            col = self.pieces[0][3]
            return stat[:, col:col + 1]
        return stat[:, self.columns]


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
            out.append(_Chunk(a, b, tuple((c0, c1, p.segment, p.column) for c0, c1, p in inside), cols.to(device),
                              segs.to(device)))
    return out


class _Inputs(NamedTuple):
    """The differentiable inputs of a walk (None where absent), whole or one chunk's part of them."""

    x: Any  # [B, H]; grouped: [B, G, H] whole, {segment: x[:, segment]} for a chunk
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    scale: Optional[torch.Tensor]  # a per-segment scale stays whole in a chunk's part
    logits: Optional[torch.Tensor]


@dataclass
class _Stats:
    """The reduced row statistics [B, width]: the sums of u^2 and of exp(y - max), the max, the teacher's lse."""

    sum_of_squares: Optional[torch.Tensor] = None
    sum_exp: Optional[torch.Tensor] = None
    max: Optional[torch.Tensor] = None
    teacher_lse: Optional[torch.Tensor] = None
    # sparse targets read as log-probabilities: each segment's sum of the values and its number of classes
    # without a positive value, [B, width] each (the tail's share: reference.teacher_log_probs)
    target_mass: Optional[torch.Tensor] = None
    target_outside: Optional[torch.Tensor] = None

    def norm(self, sum_of_squares=None):
        s = self.sum_of_squares if sum_of_squares is None else sum_of_squares
        return None if s is None else torch.sqrt(s + NORM_EPS)

    def lse(self, sum_exp=None):
        s = self.sum_exp if sum_exp is None else sum_exp
        return None if s is None else self.max + torch.log(s)


@dataclass
class _Walk:
    """Everything a walk reads besides the differentiable inputs."""

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
    # a teacher head in place of teacher_logits: teacher_x [B, Ht] (grouped [B, G, Ht]), teacher_weight [C, Ht]
    teacher_x: Optional[torch.Tensor] = None
    teacher_weight: Optional[torch.Tensor] = None
    teacher_bias: Optional[torch.Tensor] = None
    beta: float = 0.5  # jsd
    softcap: Optional[float] = None  # y = softcap tanh((u + bias) / softcap) / T
    z_loss: float = 0.0  # + z_loss lse^2 per segment (softmax and kl)
    uniform_target: float = 0.0  # added to every class's target z (sigmoid, softmax and kl)
    last_lse: Optional[torch.Tensor] = None  # [B, width] log-sum-exp of y after the forward pass (no gradient)

    @property
    def dense_teacher(self) -> bool:
        return self.teacher_logits is not None or self.teacher_weight is not None

    @property
    def sparse_tail(self) -> bool:
        """Sparse targets read as the teacher's log-probabilities: their segments' tails need two sums."""
        return self.terms.log_target and not self.dense_teacher

    # ------------------------------------------------------------------------------ one chunk's math
    def part(self, c: _Chunk, t: _Inputs) -> _Inputs:
        """Chunk c's part of the inputs."""
        xs = None
        if t.x is not None:
            xs = t.x if t.x.dim() == 2 else {s: t.x[:, s] for _, _, s, _ in c.pieces}
        return _Inputs(xs, None if t.weight is None else t.weight[c.a:c.b],
                       None if t.bias is None else t.bias[c.a:c.b],
                       t.scale if t.scale is None or self.scale_per_segment else t.scale[c.a:c.b],
                       None if t.logits is None else t.logits[:, c.a:c.b])

    def scores(self, c: _Chunk, t: _Inputs) -> torch.Tensor:
        dt = self.dtype
        if t.logits is not None:
            return t.logits.to(dt)
        w = t.weight.to(dt)
        if torch.is_tensor(t.x):
            return t.x.to(dt) @ w.t()
        return torch.cat([t.x[s].to(dt) @ w[c0 - c.a:c1 - c.a].t() for c0, c1, s, _ in c.pieces], dim=1)

    def logits(self, c: _Chunk, u: torch.Tensor, t: _Inputs, norm) -> torch.Tensor:
        y = u
        if t.scale is not None:
            gamma = t.scale.to(self.dtype)
            if self.scale_per_segment:
                gamma = gamma[c.pieces[0][2]] if len(c.pieces) == 1 else gamma[c.segments]
            y = gamma * u / c.per_class(norm)
        if t.bias is not None:
            y = y + t.bias.to(self.dtype)  # a class prior: never normalised together with x.w
        if self.softcap is not None:
            y = self.softcap * torch.tanh(y / self.softcap)
        return y / self.temperature

    def teacher(self, c: _Chunk) -> torch.Tensor:
        """The dense teacher's t / T over the chunk's classes, [B, chunk]: a slice of the given logits, or the
        teacher head's GEMM on the chunk's rows of its weight (no gradient reaches the teacher)."""
        dt = self.dtype
        if self.teacher_logits is not None:
            return self.teacher_logits[:, c.a:c.b].to(dt) / self.temperature
        with torch.no_grad():
            w = self.teacher_weight[c.a:c.b].to(dt)
            tx = self.teacher_x
            if tx.dim() == 2:
                t = tx.to(dt) @ w.t()
            else:
                t = torch.cat([tx[:, s].to(dt) @ w[c0 - c.a:c1 - c.a].t() for c0, c1, s, _ in c.pieces], dim=1)
            if self.teacher_bias is not None:
                t = t + self.teacher_bias[c.a:c.b].to(dt)
            return t / self.temperature

    def given_targets(self, c: _Chunk, B: int, device) -> torch.Tensor:
        """The sparse targets scattered over the chunk's classes, [B, chunk] (duplicates add up)."""
        dt = self.dtype
        idx = self.target_index - (c.a + self.target_offset)
        inside = (idx >= 0) & (idx < c.b - c.a)  # padding (-1) and other shards' classes fall outside
        z = torch.zeros(B, c.b - c.a, dtype=dt, device=device)
        zero = torch.zeros((), dtype=dt, device=device)
        return z.scatter_add(1, torch.where(inside, idx, 0).long(),
                             torch.where(inside, self.target_value.to(dt), zero))

    def targets(self, c: _Chunk, B: int, device, stats: _Stats) -> torch.Tensor:
        """The chunk's targets as the mode's loss reads them: z, or log z where ``terms.log_target``."""
        if self.dense_teacher:
            tl = stats.teacher_lse
            z = self.terms.target(self.teacher(c), None if tl is None else c.per_class(tl))
        else:
            z = self.given_targets(c, B, device)
            if self.terms.log_target:
                # a positive value is kept; the rest of the segment shares max(1 - mass, TAIL_MIN) evenly; the
                # segment is normalised to 1
                mass, outside = c.per_class(stats.target_mass), c.per_class(stats.target_outside)
                tail = (1 - mass).clamp(min=reference.TAIL_MIN) / outside.clamp(min=1)
                full = torch.where(z > 0, z, tail)
                return torch.log(full) - torch.log(mass + tail * outside)
        if self.uniform_target and not self.terms.log_target:
            z = z + self.uniform_target
        return z

    def elements(self, c: _Chunk, y: torch.Tensor, z: torch.Tensor, lse) -> torch.Tensor:
        """The loss per (row, class) of the chunk, [B, chunk]: a row's loss is its sum over all classes.
        The z-loss, z_loss lse^2 per segment, is spread over the segment's classes as z_loss lse^2 p_j (p sums
        to 1 over the segment): so it needs no term per segment, and a segment cut across ranks adds it once."""
        lse = None if lse is None else c.per_class(lse)
        out = self.terms.loss(y, z, lse, self.beta) * self.temperature ** self.terms.temperature_power
        if self.z_loss and self.terms.segment_lse and not self.terms.log_target:
            out = out + self.z_loss * lse * lse * torch.exp(y - lse)
        return out

    def column_sum(self, c: _Chunk, v: torch.Tensor) -> torch.Tensor:
        """[B, chunk] -> [B, width]: each row's sum over the classes of each statistics column."""
        return v.new_zeros(v.shape[0], self.width).index_add(1, c.columns, v)

    def objective(self, c: _Chunk, t: _Inputs, stats: _Stats, norm, lse, g, grad_sum_exp=None,
                  grad_sum_of_squares=None) -> torch.Tensor:
        """sum_b g_b l_b over the chunk's classes, plus the chunk's share of the statistics weighted by the
        gradients with respect to them: what a chunk contributes to the backward pass."""
        u = self.scores(c, t)
        y = self.logits(c, u, t, norm)
        z = self.targets(c, u.shape[0], u.device, stats)
        out = (g[:, None] * self.elements(c, y, z, lse)).sum()
        if grad_sum_exp is not None:
            out = out + (c.per_class(grad_sum_exp) * torch.exp(y - c.per_class(stats.max))).sum()
        if grad_sum_of_squares is not None:
            out = out + (c.per_class(grad_sum_of_squares) * u * u).sum()
        return out

    # ------------------------------------------------------------------------------ forward passes
    def statistics(self, t: _Inputs, B: int, device) -> _Stats:
        stats = _Stats()
        if t.scale is not None:
            sq = torch.zeros(B, self.width, dtype=self.dtype, device=device)
            for c in self.chunks:
                u = self.scores(c, self.part(c, t))
                sq += self.column_sum(c, u * u)
            stats.sum_of_squares = self.reduce("sum_of_squares", sq, "sum")
        if self.terms.segment_lse:
            self._log_sum_exp(stats, t, B, device)
        if self.sparse_tail:
            W = self.width
            sums = torch.zeros(B, 2 * W, dtype=self.dtype, device=device)
            for c in self.chunks:
                z = self.given_targets(c, B, device)
                sums[:, :W] += self.column_sum(c, z)
                sums[:, W:] += self.column_sum(c, (z <= 0).to(self.dtype))
            sums = self.reduce("target_mass", sums, "sum")
            stats.target_mass, stats.target_outside = sums[:, :W], sums[:, W:]
        return stats

    def _log_sum_exp(self, stats: _Stats, t: _Inputs, B: int, device) -> None:
        """Each column's max and sum of exp(y - max) (and a dense teacher's, in columns W..2W), kept online over
        the chunks, then merged over the reduce: max first, then the sums rescaled to it."""
        dt, W = self.dtype, self.width
        dense = self.dense_teacher
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
            part = self.part(c, t)
            merge(c.columns, self.logits(c, self.scores(c, part), part, norm))
            if dense:
                merge(c.columns + W, self.teacher(c))
        local = mx.clone()
        mx = self.reduce("max", mx, "max")
        # columns without a class here have max -inf and sum 0: their share stays 0 instead of 0 * exp(nan)
        share = torch.where(torch.isinf(local), torch.zeros_like(se), torch.exp(local - mx))
        se = self.reduce("sum_exp", se * share, "sum")
        stats.max, stats.sum_exp = mx[:, :W], se[:, :W]
        if dense:
            stats.teacher_lse = mx[:, W:] + torch.log(se[:, W:])

    def loss_rows(self, t: _Inputs, stats: _Stats, B: int, device) -> torch.Tensor:
        rows = torch.zeros(B, dtype=self.dtype, device=device)
        norm, lse = stats.norm(), stats.lse()
        for c in self.chunks:
            part = self.part(c, t)
            y = self.logits(c, self.scores(c, part), part, norm)
            rows += self.elements(c, y, self.targets(c, B, device, stats), lse).sum(dim=1)
        return rows

    # ------------------------------------------------------------------------------ backward passes
    def statistic_grad(self, name: str, t: _Inputs, stats: _Stats, g, grad_sum_exp=None) -> torch.Tensor:
        """d(sum_b g_b l_b) / d(statistic ``name``), "sum_exp" or "sum_of_squares", every later statistic's
        gradient given: one pass over the chunks, the statistic a leaf and the inputs constants; then reduced."""
        leaf = getattr(stats, name).detach().requires_grad_(True)
        with torch.enable_grad():
            final = stats.norm(leaf) if name == "sum_of_squares" else stats.lse(leaf)
        # each chunk's graph ends at the finished statistic (norm or lse), chained to the sum once at the end
        final_leaf = final.detach().requires_grad_(True)
        norm = final_leaf if name == "sum_of_squares" else stats.norm()
        lse = final_leaf if name == "sum_exp" else stats.lse()
        d_final = torch.zeros_like(final)
        for c in self.chunks:
            with torch.enable_grad():
                obj = self.objective(c, self.part(c, t), stats, norm, lse, g, grad_sum_exp=grad_sum_exp)
                d_final += torch.autograd.grad(obj, final_leaf)[0]
        d = torch.autograd.grad(final, leaf, d_final)[0]
        return self.reduce("grad_" + name, d, "sum")

    def input_grads(self, t: _Inputs, needs: Sequence[bool], stats: _Stats, g, grad_sum_exp,
                    grad_sum_of_squares) -> List[Optional[torch.Tensor]]:
        """Gradients of sum_b g_b l_b with respect to the inputs (None where not needed): one pass over the
        chunks, each chunk's part of the inputs leaves and the statistics constants (the statistics' dependence on
        the inputs is carried by their gradients)."""
        grads = [None if v is None or not need else torch.zeros(v.shape, dtype=self.dtype, device=v.device)
                 for v, need in zip(t, needs)]
        dx, dw, db, ds, dl = grads
        norm, lse = stats.norm(), stats.lse()
        for c in self.chunks:
            part = self.part(c, t)
            pairs = []  # (leaf, the view of its gradient that it adds to)

            def leaf(v, dest):
                if v is None or dest is None:
                    return v  # no gradient wanted: a constant
                v = v.detach().requires_grad_(True)
                pairs.append((v, dest))
                return v

            xs = part.x
            if torch.is_tensor(xs):
                xs = leaf(xs, dx)
            elif xs is not None:
                xs = {s: leaf(v, None if dx is None else dx[:, s]) for s, v in xs.items()}
            part = _Inputs(xs, leaf(part.weight, None if dw is None else dw[c.a:c.b]),
                           leaf(part.bias, None if db is None else db[c.a:c.b]),
                           leaf(part.scale, None if ds is None else ds if self.scale_per_segment else ds[c.a:c.b]),
                           leaf(part.logits, None if dl is None else dl[:, c.a:c.b]))
            if not pairs:
                continue
            with torch.enable_grad():
                obj = self.objective(c, part, stats, norm, lse, g, grad_sum_exp, grad_sum_of_squares)
                got = torch.autograd.grad(obj, [v for v, _ in pairs], allow_unused=True)
            for (_, dest), d in zip(pairs, got):
                if d is not None:
                    dest += d
        return grads


class _SoftTargetRows(torch.autograd.Function):
    """Per-row loss of a walk; backward is reverse mode over the walk's statistics (the last computed first),
    then over the inputs, each a pass over the chunks with autograd on the chunk's recomputed math."""

    @staticmethod
    def forward(ctx, walk: _Walk, x, weight, bias, scale, logits):
        t = _Inputs(x, weight, bias, scale, logits)
        src = x if x is not None else logits
        stats = walk.statistics(t, src.shape[0], src.device)
        rows = walk.loss_rows(t, stats, src.shape[0], src.device)
        ctx.walk, ctx.stats = walk, stats
        if stats.sum_exp is not None:
            walk.last_lse = stats.lse().detach()
        ctx.save_for_backward(x, weight, bias, scale, logits)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        walk, stats = ctx.walk, ctx.stats
        t = _Inputs(*(None if v is None else v.detach() for v in ctx.saved_tensors))
        g = grad_rows.to(walk.dtype)
        # every rank runs the same passes and reduces, whatever it holds (the reduces are collectives)
        grad_sum_exp = grad_sum_of_squares = None
        if stats.sum_exp is not None:
            grad_sum_exp = walk.statistic_grad("sum_exp", t, stats, g)
        if stats.sum_of_squares is not None:
            grad_sum_of_squares = walk.statistic_grad("sum_of_squares", t, stats, g, grad_sum_exp)
        grads = walk.input_grads(t, ctx.needs_input_grad[1:], stats, g, grad_sum_exp, grad_sum_of_squares)
        return (None, *(None if d is None else d.to(v.dtype) for d, v in zip(grads, t)))


def chunk_columns(batch: int, dtype: torch.dtype, memory_budget: Optional[int], temporaries: int = _TEMPS) -> int:
    """Classes per chunk such that the chunk's ``temporaries`` [B, chunk] tensors fit ``memory_budget`` bytes."""
    elem = 8 if dtype == torch.float64 else 4
    return max(1, (memory_budget or DEFAULT_MEMORY_BUDGET) // (temporaries * elem * max(batch, 1)))


def soft_target_rows(x: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     scale: Optional[torch.Tensor], *, pieces: Sequence[Piece], width: int, mode: str,
                     temperature: float = 1.0, target_index=None, target_value=None, target_offset: int = 0,
                     teacher_logits=None, scale_per_segment: bool = False, chunk: int,
                     logits: Optional[torch.Tensor] = None, reduce: Reduce = no_reduce, teacher_x=None,
                     teacher_weight=None, teacher_bias=None, beta: float = 0.5, softcap: Optional[float] = None,
                     z_loss: float = 0.0, uniform_target: float = 0.0) -> torch.Tensor:
    """Per-row loss [B] of the classes in ``pieces`` (differentiable in x, weight, bias, scale and logits).

    Raw scores come from ``x`` [B, H] (grouped [B, G, H]: a piece reads ``x[:, piece.segment]``) and ``weight``
    [C, H], or are the given ``logits`` [B, C]. ``bias`` [C], ``scale`` per class [C] or, with
    ``scale_per_segment``, indexed by ``piece.segment``. Targets: ``target_index`` holds class ids offset by
    ``target_offset`` (-1 pads); ``teacher_logits`` [B, C]; or a teacher head, ``teacher_x`` [B, Ht] (grouped
    [B, G, Ht] like x), ``teacher_weight`` [C, Ht], ``teacher_bias`` [C], whose logits are made chunk by chunk.
    ``beta``: jsd's weight (0 is kl, 1 reverse_kl). ``softcap``, ``z_loss``, ``uniform_target``: the options of
    reference.soft_target_loss. Statistics have ``width`` columns (``piece.column``); ``reduce(name, t, op)``
    ("sum" or "max") completes them, and the gradients of the sums in backward.
    Returns fp32 (fp64 for fp64 inputs).
    """
    walk = _make_walk(x, logits, pieces=pieces, width=width, mode=mode, temperature=temperature,
                      target_index=target_index, target_value=target_value, target_offset=target_offset,
                      teacher_logits=teacher_logits, scale_per_segment=scale_per_segment, chunk=chunk,
                      reduce=reduce, teacher_x=teacher_x, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                      beta=beta, softcap=softcap, z_loss=z_loss, uniform_target=uniform_target)
    return _SoftTargetRows.apply(walk, x, weight, bias, scale, logits)


def _make_walk(x, logits, *, pieces, width, mode, temperature, chunk, beta, **fields) -> _Walk:
    src = x if x is not None else logits
    if mode == "jsd" and beta in (0.0, 1.0):  # the divergence's limits (the front maps them the same way)
        mode = "kl" if beta == 0.0 else "reverse_kl"
    return _Walk(terms=TERMS[LossMode.of(mode)], temperature=float(temperature),
                 chunks=_chunks(pieces, chunk, src.device), width=width, dtype=compute_dtype(src.dtype),
                 beta=float(beta), **fields)


# ------------------------------------------------------------------------------------------ backend entry points

def _segment_pieces(bounds: Sequence[int]) -> List[Piece]:
    return [Piece(bounds[g], bounds[g + 1], g, g) for g in range(len(bounds) - 1)]


def _rows(p, x, weight, bias, logits) -> Result:
    """The loss of a validated problem; with ``p.want_lse`` also each segment's log-sum-exp of y [B, G] (no
    gradient; [B, 0] for a mode without one), as the chunked op returns them."""
    src = x if x is not None else logits
    terms = TERMS[LossMode.of(p.mode)]
    walk = _make_walk(
        x, logits, pieces=_segment_pieces(p.bounds), width=p.num_segments, mode=p.mode, temperature=p.temperature,
        target_index=p.target_index, target_value=p.target_value, target_offset=0, teacher_logits=p.teacher_logits,
        scale_per_segment=p.scale is not None and not p.scale_per_class,
        chunk=chunk_columns(p.batch, src.dtype, p.memory_budget, terms.temporaries), reduce=no_reduce,
        teacher_x=p.teacher_x, teacher_weight=p.teacher_weight, teacher_bias=p.teacher_bias, beta=p.beta,
        softcap=p.softcap, z_loss=p.z_loss, uniform_target=p.uniform_target)
    rows = _SoftTargetRows.apply(walk, x, weight, bias, p.scale, logits)
    loss = reference.reduce_loss(rows, p.sample_weight, p.reduction)
    if not p.want_lse:
        return loss
    lse = walk.last_lse if walk.last_lse is not None else rows.new_empty(p.batch, 0)
    return loss, lse


def linear_soft_target_loss(p, backend: str = "portable") -> Result:
    """The ``portable`` backend of linear_soft_target_loss, on a validated problem (kc_kernels.ops)."""
    return _rows(p, p.x, p.weight, p.bias, None)


def soft_target_loss(p, backend: str = "portable") -> Result:
    """The ``portable`` backend of soft_target_loss (given raw scores; no bias)."""
    return _rows(p, None, None, None, p.logits)
