"""CPU backend of the (linear +) soft-target loss: chunked over classes, never a [B, V] buffer.

Per chunk of classes: one BLAS GEMM for the logits u = x W_c^T + b_c, one pass of the fused C++ epilogue
(csrc/cpu/soft_target.cpp) that accumulates the loss and overwrites u with the scaled logit gradient, then the
gradient GEMMs dx += G W_c and dW_c = G^T x. Chunks hold whole segments whenever a segment fits, so statistics over
a segment (softmax log-sum-exp, the self-paced L2 norm and its gradient term) are complete inside one pass; a
segment longer than a chunk is walked several times (norm, statistics, final), recomputing its logits each time.

The gradients are computed during the forward and saved, so backward only scales them. With reduction="none" the
per-row weights of the gradient are only known in backward, so the forward computes the loss alone and backward
sweeps again. Peak extra memory: the [B, chunk] logits buffer (chunk chosen from ``memory_budget``), fp32 copies of
x and of one weight chunk for half inputs, and O(B * G) statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from kc_kernels import _C
from kc_kernels.ops.soft_target import SoftTargetProblem

DEFAULT_MEMORY_BUDGET = 64 << 20  # bytes for the chunk of logits (and of teacher logits)
MIN_CHUNK = 256

# phases and state rows of csrc/cpu/kc_cpu.h
PHASE_TEACHER, PHASE_NORM, PHASE_STATS, PHASE_FINAL = 1, 2, 4, 8
(S_SUMSQ, S_MAX, S_SUMEXP, S_SUMEXP_U, S_SUMEXP_Y, S_ZSUM, S_ZY, S_ZU, S_TMAX, S_TSUMEXP, S_R, S_S) = range(12)
SCALE_NONE, SCALE_SEGMENT, SCALE_CLASS = 0, 1, 2


@dataclass
class Chunk:
    lo: int  # global classes [lo, hi)
    hi: int
    piece_lo: List[int]  # local bounds of the segment pieces inside the chunk
    piece_seg: List[int]
    whole: bool  # every piece is a whole segment: all phases run in one pass


def plan_chunks(bounds: List[int], capacity: int, grouped: bool) -> List[List[Chunk]]:
    """Group classes into chunks of at most ``capacity`` columns.

    Returns a list of steps; a step is either [one chunk of whole segments] or the list of sub-chunks of one
    segment longer than the capacity. With grouped x, a chunk never spans two segments (each reads its own x).
    """
    steps: List[List[Chunk]] = []
    cur_lo, pieces, segs = None, [], []

    def flush(end):
        nonlocal cur_lo, pieces, segs
        if cur_lo is not None:
            steps.append([Chunk(cur_lo, end, [p - cur_lo for p in pieces] + [end - cur_lo], segs, True)])
        cur_lo, pieces, segs = None, [], []

    for g in range(len(bounds) - 1):
        lo, hi = bounds[g], bounds[g + 1]
        if hi - lo > capacity:
            flush(lo)
            steps.append([Chunk(a, min(a + capacity, hi), [0, min(a + capacity, hi) - a], [g], False)
                          for a in range(lo, hi, capacity)])
            continue
        if cur_lo is not None and (grouped or hi - cur_lo > capacity):
            flush(lo)
        if cur_lo is None:
            cur_lo = lo
        pieces.append(lo)
        segs.append(g)
    flush(bounds[-1])
    return steps


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _scratch(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A [rows, cols] fp32 view of ``buf`` when it fits, else a fresh tensor."""
    n = rows * cols
    return (buf[:n] if n <= buf.numel() else torch.empty(n, dtype=buf.dtype)).view(rows, cols)


class _Sweep:
    """One walk over the classes: loss statistics and, when ``coef`` is given, the gradients."""

    def __init__(self, p: SoftTargetProblem, memory_budget: int):
        self.p = p
        B, V = p.batch, p.num_classes
        self.G = p.num_segments
        self.linear = p.logits is None
        if self.linear:
            self.x32 = p.x.float().contiguous()
            self.H = p.x.shape[-1]
        # bytes per class column: the logits chunk, a converted teacher chunk, fp32 weight/gradient rows of half
        # weights
        per_col = 4 * B * (2 if (p.teacher_logits is not None and p.teacher_logits.dtype != torch.float32) else 1)
        if self.linear and p.weight.dtype != torch.float32:
            per_col += 8 * self.H
        self.capacity = int(min(V, max(MIN_CHUNK, memory_budget // max(per_col, 1))))
        self.steps = plan_chunks(p.bounds, self.capacity, p.grouped)
        self.softmax = p.mode == "softmax"
        self.scale_kind = SCALE_NONE
        if p.scale is not None:
            self.scale_kind = SCALE_SEGMENT if p.scale.numel() == self.G else SCALE_CLASS
            self.scale32 = p.scale.detach().float().contiguous()
        else:
            self.scale32 = None
        self.sparse = p.target_index is not None
        if self.sparse:
            self.tidx = p.target_index.long().contiguous()
            self.tval = p.target_value.float().contiguous()
        self.teacher = p.teacher_logits
        if self.teacher is not None and self.teacher.dtype == torch.float32:
            self.teacher = self.teacher.contiguous()
        self.bias32 = None if p.bias is None else p.bias.detach().float().contiguous()
        self.db32 = None
        self._w_cached = (None, None)
        self.buf = torch.empty(B * self.capacity, dtype=torch.float32)
        self.tbuf = (torch.empty(B * self.capacity, dtype=torch.float32)
                     if self.teacher is not None and self.teacher.dtype != torch.float32 else None)

    # ------------------------------------------------------------------ pieces
    def _weight_chunk(self, c: Chunk) -> torch.Tensor:
        """fp32 rows of the chunk; half weights are converted once per chunk and reused by the gradient GEMMs."""
        w = self.p.weight[c.lo:c.hi]
        if w.dtype == torch.float32:
            return w
        if self._w_cached[0] != (c.lo, c.hi):
            self._w_cached = ((c.lo, c.hi), w.float())
        return self._w_cached[1]

    def _rows_of(self, t: torch.Tensor, c: Chunk) -> torch.Tensor:
        """x (or dx) as the chunk's classes read it: [B, H], or segment g's slice of grouped [B, G, H]."""
        return t[:, c.piece_seg[0]] if self.p.grouped else t

    def _logits(self, c: Chunk, r0: int = 0, r1: Optional[int] = None) -> torch.Tensor:
        """Rows [r0, r1) of the chunk's logits, without the bias (the epilogue adds it)."""
        p = self.p
        r1 = p.batch if r1 is None else r1
        u = _scratch(self.buf, r1 - r0, c.hi - c.lo)
        if not self.linear:
            u.copy_(p.logits[r0:r1, c.lo:c.hi])
            return u
        torch.mm(self._rows_of(self.x32, c)[r0:r1], self._weight_chunk(c).t(), out=u)
        return u

    def _teacher(self, c: Chunk, r0: int, r1: int):
        """(address, row stride, converted copy or None) of the teacher logits of the chunk's classes from row r0
        on, as fp32; the caller keeps the copy alive until the kernel has read it."""
        if self.teacher is None:
            return 0, 0, None
        if self.tbuf is None:  # fp32 teacher: read in place
            return self.teacher.data_ptr() + 4 * (c.lo + r0 * self.teacher.shape[1]), self.teacher.shape[1], None
        t = _scratch(self.tbuf, r1 - r0, c.hi - c.lo)
        t.copy_(self.teacher[r0:r1, c.lo:c.hi])
        return t.data_ptr(), t.shape[1], t

    def _kernel(self, c: Chunk, u: Optional[torch.Tensor], phases: int, coef: Optional[torch.Tensor],
                add_bias: bool = False, rows: Optional[tuple] = None):
        """One epilogue call; ``add_bias`` when ``u`` comes fresh from the GEMM (x W^T without the bias).
        ``rows`` = (r0, r1): ``u`` holds only those rows (the row-block walk of a long segment)."""
        p = self.p
        r0, r1 = rows if rows is not None else (0, p.batch)
        state = self.state if rows is None else self.state[:, r0:r1].contiguous()
        lo_t = torch.tensor(c.piece_lo, dtype=torch.long)
        seg_t = torch.tensor(c.piece_seg, dtype=torch.long)
        tptr, tld, _teacher_copy = self._teacher(c, r0, r1)
        dsc = dbias = 0
        if coef is not None and self.scale_kind == SCALE_CLASS and phases & PHASE_FINAL:
            dsc = self.dscale.data_ptr() + 4 * c.lo
        if coef is not None and self.db32 is not None and phases & PHASE_FINAL:
            dbias = self.db32.data_ptr() + 4 * c.lo
        K = self.tidx.shape[1] if self.sparse else 0
        _C.soft_target_chunk(
            _ptr(u), c.hi - c.lo, r1 - r0, c.hi - c.lo, c.lo, len(c.piece_seg), lo_t.data_ptr(), seg_t.data_ptr(),
            self.G, phases, int(self.softmax), 1.0 / p.temperature, p.temperature ** 2, _ptr(self.scale32),
            self.scale_kind, _ptr(self.tidx) + 8 * K * r0 if self.sparse else 0,
            _ptr(self.tval) + 4 * K * r0 if self.sparse else 0, K, tptr, tld,
            _ptr(coef) + 4 * r0 if coef is not None else 0, state.data_ptr(), self.softplus.data_ptr() + 8 * r0, dsc,
            _ptr(self.bias32) if add_bias else 0, dbias)
        if rows is not None:
            self.state[:, r0:r1] = state

    def _row_blocks(self, step: List[Chunk], phases: int, coef: Optional[torch.Tensor]):
        """A segment longer than a chunk, walked in blocks of rows that each hold the whole segment: every phase
        runs in one pass, so the logits GEMM runs once (instead of once per phase) and dW_seg accumulates over
        the row blocks."""
        p = self.p
        lo, hi, g = step[0].lo, step[-1].hi, step[0].piece_seg[0]
        n = hi - lo
        c = Chunk(lo, hi, [0, n], [g], True)
        block = min(p.batch, max(32, self.capacity * p.batch // n))
        dw = None  # fp32 rows of dW accumulated over the row blocks
        if coef is not None and self.dw is not None:
            dw = self.dw[lo:hi] if self.dw.dtype == torch.float32 else torch.empty(n, self.H)
        for r0 in range(0, p.batch, block):
            r1 = min(p.batch, r0 + block)
            u = self._logits(c, r0, r1)
            self._kernel(c, u, phases, coef, add_bias=True, rows=(r0, r1))
            if coef is not None:
                self._accumulate_grads(c, u, r0, r1, dw=dw, add=r0 > 0)
        if dw is not None and self.dw.dtype != torch.float32:
            self.dw[lo:hi].copy_(dw)

    def _accumulate_grads(self, c: Chunk, g: torch.Tensor, r0: int = 0, r1: Optional[int] = None,
                          dw: Optional[torch.Tensor] = None, add: bool = False):
        """Gradient GEMMs of the logit gradient ``g`` (rows [r0, r1) of the chunk): dx += g W_c and dW_c = g^T x
        into ``dw`` (default: the chunk's rows of dW), added to it when ``add``."""
        p = self.p
        r1 = p.batch if r1 is None else r1
        if not self.linear:
            self.dlogits[r0:r1, c.lo:c.hi].copy_(g)
            return
        w = self._weight_chunk(c)
        x = self._rows_of(self.x32, c)[r0:r1]
        if self.dx is not None:
            self._rows_of(self.dx, c)[r0:r1].addmm_(g, w)
        if self.dw is None:
            return
        dw = self.dw[c.lo:c.hi] if dw is None else dw
        if add:
            dw.addmm_(g.t(), x)
        elif dw.dtype == torch.float32:
            torch.mm(g.t(), x, out=dw)
        else:
            dw.copy_(g.t() @ x)

    # ------------------------------------------------------------------ the walk
    def run(self, coef: Optional[torch.Tensor], needs=("x", "weight", "bias", "logits", "scale")):
        """Per-row loss (float64 [B]); with ``coef`` [B] also the gradients (of the inputs named in ``needs``)
        scaled row-wise by it. Gradient GEMMs of inputs that need no gradient are skipped."""
        p = self.p
        B = p.batch
        self.state = torch.zeros(12, B, self.G, dtype=torch.float64)
        self.state[S_MAX] = -math.inf
        self.state[S_TMAX] = -math.inf
        self.softplus = torch.zeros(B, dtype=torch.float64)
        grads = coef is not None
        if grads:
            coef = coef.float().contiguous()
            if self.linear:
                wdt = torch.float32 if p.weight.dtype == torch.float64 else p.weight.dtype
                self.dx = torch.zeros_like(self.x32) if "x" in needs else None
                self.dw = torch.empty_like(p.weight, dtype=wdt) if "weight" in needs else None
                # the epilogue accumulates the bias gradient (column sums of the logit gradient) in fp32
                self.db32 = (torch.zeros(p.num_classes, dtype=torch.float32)
                             if p.bias is not None and "bias" in needs else None)
            else:
                self.dlogits = torch.empty(p.logits.shape, dtype=p.logits.dtype if p.logits.dtype != torch.float64
                                           else torch.float32)
            self.dscale = torch.zeros(p.num_classes, dtype=torch.float32) if self.scale_kind == SCALE_CLASS else None
        need_norm = self.scale_kind != SCALE_NONE
        need_stats = self.softmax or need_norm
        final = PHASE_FINAL if (grads or not self.softmax) else 0

        if self.softmax and self.teacher is not None:
            for step in self.steps:
                for c in step:
                    self._kernel(c, None, PHASE_TEACHER, None)
        whole_phases = (PHASE_NORM if need_norm else 0) | (PHASE_STATS if need_stats else 0) | final
        for step in self.steps:
            if step[0].whole:
                c = step[0]
                u = self._logits(c)
                self._kernel(c, u, whole_phases, coef, add_bias=True)
                if grads:
                    self._accumulate_grads(c, u)
                continue
            if self.linear and (need_norm or need_stats):
                self._row_blocks(step, whole_phases, coef if grads else None)
                continue
            # a segment longer than a chunk: one walk per phase, recomputing its logits
            for phase, needed in ((PHASE_NORM, need_norm), (PHASE_STATS, need_stats), (final, final != 0)):
                if not needed:
                    continue
                for c in step:
                    u = self._logits(c)
                    self._kernel(c, u, phase, coef if phase == PHASE_FINAL else None, add_bias=True)
                    if phase == PHASE_FINAL and grads:
                        self._accumulate_grads(c, u)

        st = self.state
        if self.softmax:
            lse = st[S_MAX] + torch.log(st[S_SUMEXP])
            zl = torch.where(st[S_ZSUM] != 0, st[S_ZSUM] * lse, torch.zeros_like(lse))
            loss = p.temperature ** 2 * (zl - st[S_ZY]).sum(dim=1)
        else:
            loss = self.softplus - st[S_ZY].sum(dim=1)
        if not grads:
            return loss, None
        out = {}
        if self.linear:
            out["x"] = None if self.dx is None else self.dx.view_as(p.x).to(p.x.dtype)
            out["weight"] = None if self.dw is None else self.dw.to(p.weight.dtype)
            out["bias"] = None if self.db32 is None else self.db32.to(p.bias.dtype)
        else:
            out["logits"] = self.dlogits.to(p.logits.dtype)
        if self.scale_kind == SCALE_SEGMENT:
            out["scale"] = (coef.double()[:, None] * st[S_R]).sum(dim=0).to(p.scale.dtype)
        elif self.scale_kind == SCALE_CLASS:
            out["scale"] = self.dscale.to(p.scale.dtype)
        return loss, out


def _row_coef(p: SoftTargetProblem, grad_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weight of each row's gradient: sample weight x reduction factor (x the incoming gradient for "none")."""
    coef = torch.ones(p.batch, dtype=torch.float64)
    if p.sample_weight is not None:
        coef = coef * p.sample_weight.detach().double()
    if p.reduction == "mean":
        coef = coef / p.batch
    if grad_rows is not None:
        coef = coef * grad_rows.double()
    return coef


def _reduce(loss_rows: torch.Tensor, p: SoftTargetProblem) -> torch.Tensor:
    if p.sample_weight is not None:
        loss_rows = loss_rows * p.sample_weight.detach().double()
    if p.reduction == "none":
        return loss_rows
    s = loss_rows.sum()
    return s / p.batch if p.reduction == "mean" else s


class _SoftTargetFunction(torch.autograd.Function):
    """Inputs: the differentiable tensors (x, weight, bias, scale) or (logits, scale); the problem rides along."""

    @staticmethod
    def forward(ctx, problem, memory_budget, *tensors):
        sweep = _Sweep(problem, memory_budget)
        names = ("x", "weight", "bias", "scale") if sweep.linear else ("logits", "scale")
        ctx.names = names
        ctx.problem, ctx.memory_budget = problem, memory_budget
        wants = any(ctx.needs_input_grad[2:])
        ctx.needs = tuple(n for n, need in zip(names, ctx.needs_input_grad[2:]) if need)
        out_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
        ctx.out_dtype = out_dtype
        if wants and problem.reduction != "none":
            loss_rows, grads = sweep.run(_row_coef(problem), ctx.needs)
            ctx.grads = grads
        else:
            loss_rows, _ = sweep.run(None)
            ctx.grads = None
        return _reduce(loss_rows, problem).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        p = ctx.problem
        grads, ctx.grads = ctx.grads, None  # a second backward (retain_graph) sweeps again
        if grads is not None:
            # scale in place: a scaled copy would hold a second V x H weight gradient at the peak
            if float(grad_out) != 1.0:
                for v in grads.values():
                    if v is not None:
                        v.mul_(grad_out.to(v.dtype))
        else:
            rows = grad_out.detach() if p.reduction == "none" else None
            coef = _row_coef(p, rows)
            if rows is None:
                coef = coef * float(grad_out)
            _, grads = _Sweep(p, ctx.memory_budget).run(coef, ctx.needs)
        result = [None, None]
        for i, name in enumerate(ctx.names):
            result.append(grads.get(name) if ctx.needs_input_grad[2 + i] else None)
        return tuple(result)


def linear_soft_target_loss(p: SoftTargetProblem) -> torch.Tensor:
    budget = p.memory_budget or DEFAULT_MEMORY_BUDGET
    return _SoftTargetFunction.apply(p, budget, p.x, p.weight, p.bias, p.scale)


def soft_target_loss(p: SoftTargetProblem) -> torch.Tensor:
    budget = p.memory_budget or DEFAULT_MEMORY_BUDGET
    return _SoftTargetFunction.apply(p, budget, p.logits, p.scale)
