"""The chunked driver of the (linear +) soft-target loss, shared by every fast backend (docs/epilogue.md).

Per chunk of classes: the logits GEMM S = x W_c^T (torch: MKL/oneDNN on CPU, cuBLAS on GPU), the backend's epilogue
(loss statistics, then S overwritten in place by coef_b * dL/du), then the gradient GEMMs dx += S W_c and
dW_c = S^T x, each chunk's dW rows written once. The gradients are produced in the forward pass (3 GEMMs), so the
backward only scales them; nothing is accumulated with atomics, and the same inputs give the same bits. The plan of
chunks is kc_kernels/layout.py; the custom op that runs a ``Sweep`` is kc_kernels/chunked.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Protocol, Sequence, Tuple

import torch

from kc_kernels.host_buffers import give_back_workspace, output_buffer, take_workspace
from kc_kernels.layout import (
    HALF_ADD_BLOCKS,
    MIN_CHUNK,
    NUM_STATES,
    Chunk,
    Phase,
    ScaleKind,
    State,
    padded_row_stride,
    plan,
)
from kc_kernels.loss_modes import LossMode
from kc_kernels.reduction import reduce_loss, row_weights


class EpilogueWalk(Protocol):
    """One walk's epilogue: the inputs it prepared for its kernels (``Epilogue.begin``) and its calls. It keeps
    no reference to the sweep (each call is handed it), so a walk's buffers die with the op call, not with a
    collection of a reference cycle (the kept gradient outputs depend on it)."""

    def run(self, sw: "Sweep", c: Chunk, u: Optional[torch.Tensor], phases: int, coef: Optional[torch.Tensor],
            rows: Optional[Tuple[int, int]]) -> None:
        """The ``phases`` (a PHASE_* bitmask) over chunk ``c``'s raw scores ``u`` (None in a TEACHER-only call):
        statistics into ``sweep.state``; in FINAL the loss sums and, with ``coef``, ``u`` overwritten by
        coef * dL/du, the bias and per-class scale gradients added to ``sweep.db32`` / ``sweep.dscale``.
        ``rows`` = (r0, r1): ``u`` holds only those rows (a long segment's row block)."""

    def after_teacher(self, sw: "Sweep") -> None:
        """Called once the teacher phase has run over every class (e.g. to report a NaN teacher)."""


class Epilogue(Protocol):
    """What a backend gives the driver (its row's ``epilogue`` in kc_kernels/dispatch.py): sizes and dtypes of
    the walk, and ``begin``, which returns the object that owns one walk's epilogue inputs."""

    state_dtype: torch.dtype  # of the [NUM_STATES, B, G] statistics
    default_memory_budget: int  # bytes, when the call gives none
    # the default grows with the problem up to the bytes of the weight gradient the op returns anyway (a long
    # segment then walks fewer, taller row blocks; working memory stays within the op's own output)
    budget_grows_to_weight_grad: bool
    chunk_bytes: Optional[int]  # a cap on a column chunk below the budget (None: the budget)
    fuses_teacher: bool  # runs TEACHER in the same call as the other phases where a call holds whole segments

    def work_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the GEMMs and of the scores for inputs of ``dtype``."""

    def bytes_per_class(self, sw: "Sweep") -> int:
        """Bytes a class of a chunk costs (the scores column and the epilogue's own per-class buffers)."""

    def begin(self, sw: "Sweep") -> EpilogueWalk:
        """The epilogue of the walk ``sw``."""


@dataclass(frozen=True)
class Phases:
    """Which phases a walk runs, and where (docs/epilogue.md)."""

    norm: bool  # the self-paced norm (a scale was given)
    stats: bool  # segment statistics (a mode with a segment log-sum-exp, or a scale)
    mix: int  # Phase.MIX (the JSD's sums over the mixture, after STATS), or 0
    final: int  # Phase.FINAL, or 0 (such a mode's loss without gradients needs no FINAL: the statistics hold it)
    teacher: bool  # a dense teacher's log-sum-exp (the softmax's targets)
    fused: bool  # the teacher phase runs in the calls of the other phases where they hold whole segments
    whole: int  # the bitmask of a call that holds whole segments


class Sweep:
    """One walk over the classes of a validated problem: the loss statistics and, when ``coef`` is given, the
    gradients. ``epilogue`` is the backend's (see kc_kernels/cpu/epilogue.py for the interface)."""

    def __init__(self, p: Any, epilogue: Epilogue, memory_budget: int):  # p: ops.soft_target.SoftTargetProblem
        if not memory_budget:  # 0: the epilogue's default
            memory_budget = epilogue.default_memory_budget
            if epilogue.budget_grows_to_weight_grad and p.logits is None:
                memory_budget = max(memory_budget, p.weight.numel() * p.weight.element_size())
        self.p, self.ep = p, epilogue
        self.G = p.num_segments
        self.linear = p.logits is None
        self.device = (p.x if self.linear else p.logits).device
        inp = p.x if self.linear else p.logits
        self.work_dtype = epilogue.work_dtype(inp.dtype)
        self.buf_itemsize = torch.empty((), dtype=self.work_dtype).element_size()
        self.state_dtype = epilogue.state_dtype
        if self.linear:
            self.H = p.x.shape[-1]
            self.xw = p.x.to(self.work_dtype)
            if self.xw.dim() == 3 or not self.xw.is_contiguous():
                self.xw = self.xw.contiguous()
        self.mode = LossMode.of(p.mode)
        if self.mode == LossMode.KL and p.uniform_target:
            raise ValueError("uniform_target: mode 'kl' takes none (its loss's sum z log z over the smoothed targets "
                             "needs every class's target); use mode 'softmax', whose gradient is the same")
        # sparse top-K probabilities under a mode that reads the teacher at every class become a dense teacher
        self.teacher_from_targets = p.target_index is not None and self.mode.terms.dense_teacher
        self.has_teacher = (p.teacher_logits is not None or p.teacher_weight is not None
                            or self.teacher_from_targets)
        # a teacher chunk the driver makes (a head's, a filled top-K's) comes out of the same budget: giving it a
        # share beside the budget (taller student row blocks) measured no faster (docs/performance.md)
        per_col = epilogue.bytes_per_class(self) + self._teacher_bytes_per_class()
        # column chunks of at most the epilogue's chunk_bytes (the CPU's: small enough that the chunk the logits GEMM
        # writes is still in cache when the epilogue and the gradient GEMMs read it); a segment longer than a chunk
        # is walked in row blocks that may use the whole budget (fewer passes over its weight rows)
        chunk_budget = min(memory_budget, epilogue.chunk_bytes or memory_budget)
        self.capacity = int(min(p.num_classes, max(MIN_CHUNK, chunk_budget // max(per_col, 1))))
        full_capacity = int(min(p.num_classes, max(MIN_CHUNK, memory_budget // max(per_col, 1))))
        self.block_elems = p.batch * self.row_stride(full_capacity)
        self.plan = plan(tuple(p.bounds), self.capacity, p.grouped)
        self.scale_kind = ScaleKind.NONE
        self.scale32 = None
        if p.scale is not None:
            per_segment = p.scale.numel() == self.G and not p.scale_per_class
            self.scale_kind = ScaleKind.SEGMENT if per_segment else ScaleKind.CLASS
            self.scale32 = p.scale.detach().float().contiguous()
        self.bias32 = None if p.bias is None else p.bias.detach().float().contiguous()
        self._init_teacher()
        self.buf = take_workspace(p.batch * self.row_stride(self.capacity), self.work_dtype, self.device)
        self._w_cached: Tuple[Optional[Tuple[int, int]], Optional[torch.Tensor]] = (None, None)
        self.walk = epilogue.begin(self)

    # ------------------------------------------------------------------ the teacher
    def _teacher_bytes_per_class(self) -> int:
        """A teacher head's (or a filled top-K teacher's) chunk of logits, per class (fp32 on the CPU)."""
        if self.p.teacher_weight is None and not self.teacher_from_targets:
            return 0
        per = 4 if self.device.type == "cpu" else self.buf_itemsize
        tw = self.p.teacher_weight
        converted = tw is not None and tw.dtype != (torch.float32 if self.device.type == "cpu" else self.work_dtype)
        return self.p.batch * per + (tw.shape[1] * 4 if converted else 0)  # (a converted weight chunk is kept)

    def _init_teacher(self) -> None:
        p = self.p
        self._tw_cached: Tuple[Optional[Tuple[int, int]], Optional[torch.Tensor]] = (None, None)
        self.tbuf: Optional[torch.Tensor] = None
        if p.teacher_weight is not None:
            # the head's GEMMs run in the student's work dtype on a GPU, in fp32 on the CPU (the epilogue reads fp32)
            self.teacher_dtype = torch.float32 if self.device.type == "cpu" else self.work_dtype
            tx = p.teacher_x.to(self.teacher_dtype)
            self.teacher_x = tx.contiguous() if tx.dim() == 3 or not tx.is_contiguous() else tx
            self.teacher_b = None if p.teacher_bias is None else p.teacher_bias.to(self.teacher_dtype)
        elif self.teacher_from_targets:
            self.teacher_dtype = torch.float32
            self._topk = _sparse_teacher(p, self.plan.seg_of_class(self.device))

    def teacher_chunk(self, c: Chunk, r0: int = 0, r1: Optional[int] = None) -> Optional[torch.Tensor]:
        """Rows [r0, r1) of the chunk's teacher logits, [r1 - r0, hi - lo] with unit column stride: a view of the
        dense teacher_logits; for a teacher head, its GEMM into a scratch buffer (reused by the next chunk, so
        read it before asking for another); for sparse top-K probabilities under reverse KL or JSD, T log z of the
        teacher distribution reference.teacher_log_probs defines. None without a teacher."""
        p = self.p
        r1 = p.batch if r1 is None else r1
        if p.teacher_logits is not None:
            return p.teacher_logits[r0:r1, c.lo:c.hi]
        if not self.has_teacher:
            return None
        n = (r1 - r0) * (c.hi - c.lo)
        if self.tbuf is None or self.tbuf.numel() < n:
            self.tbuf = torch.empty(n, dtype=self.teacher_dtype, device=self.device)
        t = self.tbuf[:n].view(r1 - r0, c.hi - c.lo)
        if p.teacher_weight is not None:
            key, w = self._tw_cached
            if key != (c.lo, c.hi) or w is None:
                w = p.teacher_weight[c.lo:c.hi].to(self.teacher_dtype)
                self._tw_cached = ((c.lo, c.hi), w)
            x = self.teacher_x[:, c.piece_seg[0]] if self.teacher_x.dim() == 3 else self.teacher_x
            if self.teacher_b is not None:
                torch.addmm(self.teacher_b[c.lo:c.hi], x[r0:r1], w.t(), out=t)
            else:
                torch.mm(x[r0:r1], w.t(), out=t)
            return t
        tail, rows, cols, logv = self._topk
        seg = self.plan.seg_of_class(self.device)[c.lo:c.hi].long()
        torch.index_select(tail[r0:r1], 1, seg, out=t)
        keep = (rows >= r0) & (rows < r1) & (cols >= c.lo) & (cols < c.hi)
        t[rows[keep] - r0, cols[keep] - c.lo] = logv[keep]
        return t.mul_(p.temperature)

    # ------------------------------------------------------------------ GEMM pieces
    def row_stride(self, cols: int) -> int:
        return padded_row_stride(cols, self.buf_itemsize)

    def scratch(self, rows: int, cols: int) -> torch.Tensor:
        ld = self.row_stride(cols)
        n = rows * ld
        if n > self.buf.numel():  # a long segment's row blocks: grown once, reused by every block
            self.buf = take_workspace(n, self.work_dtype, self.device)
        full = self.buf[:n].view(rows, ld)
        if ld > cols and self.buf_itemsize < 4 and self.device.type == "cpu":
            # oneDNN's half-precision GEMM (bf16 on AMX CPUs) reads a strided operand's row padding and masks it
            # by multiplication: finite padding leaves the result bit-identical, NaN bits in never-written memory
            # make NaN rows of dx. Zeroing the padding costs (ld - cols) of every ld elements.
            full[:, cols:].zero_()
        return full[:, :cols]

    def weight_chunk(self, c: Chunk) -> torch.Tensor:
        """The chunk's weight rows in the work dtype; converted once per chunk and reused by the gradient GEMMs."""
        w = self.p.weight[c.lo:c.hi]
        if w.dtype == self.work_dtype:
            return w
        key, cached = self._w_cached
        if key != (c.lo, c.hi) or cached is None:
            cached = w.to(self.work_dtype)
            self._w_cached = ((c.lo, c.hi), cached)
        return cached

    def rows_of(self, t: torch.Tensor, c: Chunk) -> torch.Tensor:
        """x (or dx) as the chunk's classes read it: [B, H], or segment g's slice of grouped [B, G, H]."""
        return t[:, c.piece_seg[0]] if self.p.grouped else t

    def logits(self, c: Chunk, r0: int = 0, r1: Optional[int] = None) -> torch.Tensor:
        """Rows [r0, r1) of the chunk's raw scores (x W^T, no bias: the epilogue adds it after the scale)."""
        p = self.p
        r1 = p.batch if r1 is None else r1
        if not self.linear:
            if self.dlogits is not None and self.dlogits.dtype == self.work_dtype:
                # the gradient of given logits is an output of the op anyway: work in place there
                u = self.dlogits[r0:r1, c.lo:c.hi]
            else:
                u = self.scratch(r1 - r0, c.hi - c.lo)
            u.copy_(p.logits[r0:r1, c.lo:c.hi])
            return u
        u = self.scratch(r1 - r0, c.hi - c.lo)
        torch.mm(self.rows_of(self.xw, c)[r0:r1], self.weight_chunk(c).t(), out=u)
        return u

    def accumulate_grads(self, c: Chunk, g: torch.Tensor, r0: int = 0, r1: Optional[int] = None,
                         dw: Optional[torch.Tensor] = None, add: bool = False) -> None:
        """Gradient GEMMs of the logit gradient ``g`` (rows [r0, r1) of the chunk): dx += g W_c and dW_c = g^T x
        into ``dw`` (default: the chunk's rows of dW), added to it when ``add``."""
        p = self.p
        r1 = p.batch if r1 is None else r1
        if not self.linear:
            assert self.dlogits is not None
            target = self.dlogits[r0:r1, c.lo:c.hi]
            if target.data_ptr() != g.data_ptr():
                target.copy_(g)
            return
        w = self.weight_chunk(c)
        x = self.rows_of(self.xw, c)[r0:r1]
        if self.dx is not None:
            dx = self.rows_of(self.dx, c)[r0:r1]
            if self.dx.dtype == g.dtype:
                dx.addmm_(g, w)
            else:  # half GEMM, fp32 accumulation over the chunks
                dx.add_(g @ w)
        if self.dw is None:
            return
        dw = self.dw[c.lo:c.hi] if dw is None else dw
        if add:
            if dw.dtype == g.dtype:
                dw.addmm_(g.t(), x)
            else:
                dw.add_(g.t() @ x)
        elif dw.dtype == g.dtype:
            torch.mm(g.t(), x, out=dw)
        else:
            dw.copy_(g.t() @ x)

    # ------------------------------------------------------------------ walks
    def _row_blocks(self, step, phases: int, coef: Optional[torch.Tensor]):
        """A segment longer than a chunk, walked in blocks of rows that each hold the whole segment: every phase
        runs in one pass, so the logits GEMM runs once per block and dW_seg accumulates over the blocks."""
        p = self.p
        lo, hi, g = step[0].lo, step[-1].hi, step[0].piece_seg[0]
        n = hi - lo
        c = Chunk(lo, hi, (0, n), (g,), True)
        block = min(p.batch, max(32, self.block_elems // self.row_stride(n)))
        # dW_seg accumulates over the row blocks: in place when dW is fp32, or half with at most HALF_ADD_BLOCKS
        # blocks (each addmm_ rounds the running sum once, fp32 inside the GEMM: a few roundings, and no [n, H]
        # half GEMM output converted and added per block, which was much slower: docs/performance.md); else in an
        # fp32 accumulator
        blocks = -(-p.batch // block)
        dw = None
        if coef is not None and self.dw is not None:
            in_place = (self.dw.dtype == torch.float32
                        or (self.dw.dtype == self.work_dtype and blocks <= HALF_ADD_BLOCKS))
            dw = self.dw[lo:hi] if in_place else torch.empty(n, self.H, dtype=torch.float32, device=self.device)
        for r0 in range(0, p.batch, block):
            r1 = min(p.batch, r0 + block)
            u = self.logits(c, r0, r1)
            self.walk.run(self, c, u, phases, coef, (r0, r1))
            self._hard_label_grads(c, u, coef, r0, r1)
            if coef is not None:
                self.accumulate_grads(c, u, r0, r1, dw=dw, add=r0 > 0)
        if dw is not None and self.dw is not None and dw.data_ptr() != self.dw[lo:hi].data_ptr():
            self.dw[lo:hi].copy_(dw)

    def run(self, coef: Optional[torch.Tensor], needs: Sequence[str] = ("x", "weight", "bias", "logits", "scale")
            ) -> Tuple[torch.Tensor, Optional[Dict[str, Optional[torch.Tensor]]]]:
        """Per-row loss [B] (state dtype); with ``coef`` [B] also the gradients (of the inputs named in ``needs``)
        scaled row-wise by it. Gradient GEMMs of inputs that need no gradient are skipped."""
        grads = coef is not None
        coef = self._allocate(coef, needs)
        self._seed_hard_mass()
        self._walk(self._phases(grads), coef, grads)
        return self._assemble(coef, grads)

    def _allocate(self, coef: Optional[torch.Tensor], needs: Sequence[str]) -> Optional[torch.Tensor]:
        """The statistics, and with ``coef`` the gradient buffers of the inputs named in ``needs``; ``coef`` as
        the epilogue reads it."""
        p = self.p
        B, dev = p.batch, self.device
        self.state = torch.zeros(NUM_STATES, B, self.G, dtype=self.state_dtype, device=dev)
        self.state[State.MAX] = -math.inf
        self.state[State.TMAX] = -math.inf
        self.softplus = torch.zeros(B, dtype=self.state_dtype, device=dev)
        self.dx = self.dw = self.db32 = self.dscale = self.dlogits = None
        if coef is None:
            return None
        coef = coef.float().contiguous()
        if self.linear:
            # dx accumulates over chunks: fp32 unless the GEMMs themselves are fp32
            self.dx = torch.zeros(self.xw.shape, dtype=torch.float32, device=dev) if "x" in needs else None
            wdt = torch.float32 if p.weight.dtype == torch.float64 else p.weight.dtype
            self.dw = output_buffer(p.weight.shape, wdt, dev) if "weight" in needs else None
            self.db32 = (torch.zeros(p.num_classes, dtype=torch.float32, device=dev)
                         if p.bias is not None and "bias" in needs else None)
        else:
            ldt = torch.float32 if p.logits.dtype == torch.float64 else p.logits.dtype
            self.dlogits = output_buffer(p.logits.shape, ldt, dev)
        self.dscale = (torch.zeros(p.num_classes, dtype=torch.float32, device=dev)
                       if self.scale_kind == ScaleKind.CLASS and "scale" in needs else None)
        if not B and self.dw is not None:
            self.dw.zero_()  # an empty batch walks nothing: dW is an uninitialised output otherwise
        return coef

    def _seed_hard_mass(self) -> None:
        """A hard-label term in the walk (softmax/kl, T = 1, one segment): its p_j - [j = label] gradient is the
        softmax's own q with the label's weight added to the mass m, which the kernels read from ZSUM (and its
        lse term of the loss comes with it); the -1 at the label is the driver's (_hard_label_grads) and so is its
        -y[label] in the loss (_assemble)."""
        p = self.p
        if p.hard_labels is not None:
            self.state[State.ZSUM, :, 0] += (p.hard_labels >= 0).to(self.state.dtype) * p.hard_weight

    def _hard_label_grads(self, c: Chunk, u: torch.Tensor, coef: Optional[torch.Tensor], r0: int, r1: int) -> None:
        """The hard term's -coef * weight at each row's label in the chunk's logit gradient ``u`` (rows [r0, r1)),
        before the gradient GEMMs read it."""
        p = self.p
        if p.hard_labels is None or coef is None:
            return
        lab = p.hard_labels[r0:r1]
        hit = (lab >= c.lo) & (lab < c.hi)
        rows = hit.nonzero()[:, 0]
        if rows.numel():
            vals = u[rows, lab[rows] - c.lo].float() - coef[r0:r1][rows].float() * p.hard_weight
            u[rows, lab[rows] - c.lo] = vals.to(u.dtype)
        if self.db32 is not None and rows.numel():
            self.db32.index_add_(0, lab[rows], -coef[r0:r1][rows].float() * p.hard_weight)

    def _phases(self, grads: bool) -> Phases:
        norm = self.scale_kind != ScaleKind.NONE
        terms = self.mode.terms
        stats = terms.segment_lse or norm
        mix = Phase.MIX if terms.mix else 0
        final = Phase.FINAL if (grads or not terms.segment_lse) else 0
        teacher = terms.teacher_lse and self.has_teacher
        # an epilogue that fuses the teacher phase runs it in the same call as the other phases wherever a call
        # holds whole segments (a whole chunk, or a long segment's row block): the teacher is read once, while its
        # rows are in cache, instead of in a walk of its own
        fused = teacher and self.ep.fuses_teacher
        whole = ((Phase.NORM if norm else 0) | (Phase.STATS if stats else 0) | mix | final
                 | (Phase.TEACHER if fused else 0))
        return Phases(norm, stats, mix, final, teacher, fused, whole)

    def _walk(self, ph: Phases, coef: Optional[torch.Tensor], grads: bool) -> None:
        """Every step of the plan (none for an empty batch): the teacher walk where it is not fused, then each chunk
        of whole segments in one call, each long segment in row blocks (or, for given logits, once per phase)."""
        steps = self.plan.steps if self.p.batch else []
        if ph.teacher:
            for step in steps:
                if ph.fused and (step[0].whole or (self.linear and (ph.norm or ph.stats))):
                    continue
                for c in step:
                    self.walk.run(self, c, None, Phase.TEACHER, None, None)
            if not ph.fused:
                self.walk.after_teacher(self)
        for step in steps:
            if step[0].whole:
                c = step[0]
                u = self.logits(c)
                self.walk.run(self, c, u, ph.whole, coef, None)
                self._hard_label_grads(c, u, coef if grads else None, 0, self.p.batch)
                if grads:
                    self.accumulate_grads(c, u)
                continue
            if self.linear and (ph.norm or ph.stats):
                self._row_blocks(step, ph.whole, coef if grads else None)
                continue
            # a segment longer than a chunk: one walk per phase, recomputing (or re-reading) its logits
            for phase, needed in ((Phase.NORM, ph.norm), (Phase.STATS, ph.stats), (ph.mix, ph.mix != 0),
                                  (ph.final, ph.final != 0)):
                if not needed:
                    continue
                for c in step:
                    u = self.logits(c)
                    self.walk.run(self, c, u, phase, coef if phase == Phase.FINAL else None, None)
                    if phase == Phase.FINAL and grads:
                        self._hard_label_grads(c, u, coef, 0, self.p.batch)
                        self.accumulate_grads(c, u)
        give_back_workspace(self.buf)  # no output views it
        if ph.fused:
            self.walk.after_teacher(self)

    def _label_logits(self) -> torch.Tensor:
        """[B] y[label] of the rows with a hard label (0 elsewhere): x . w_label + bias_label (T = 1, no scale)."""
        p = self.p
        lab = p.hard_labels
        ok = lab >= 0
        safe = torch.where(ok, lab, torch.zeros_like(lab))
        dt = self.state.dtype
        y = (p.x.to(dt) * p.weight[safe].to(dt)).sum(dim=1)
        if p.bias is not None:
            y = y + p.bias[safe].to(dt)
        return torch.where(ok, y, torch.zeros_like(y))

    def segment_lse(self) -> torch.Tensor:
        """[B, G] log-sum-exp of y per row and segment after a walk ([B, 0] for a mode without one)."""
        if not self.mode.terms.segment_lse:
            return self.state.new_empty(self.p.batch, 0)
        return self.state[State.MAX] + torch.log(self.state[State.SUMEXP])

    def _assemble(self, coef: Optional[torch.Tensor], grads: bool
                  ) -> Tuple[torch.Tensor, Optional[Dict[str, Optional[torch.Tensor]]]]:
        """The per-row loss from the statistics, and the gradients in the inputs' dtypes."""
        p, st = self.p, self.state
        t2 = p.temperature ** 2
        loss = self.mode.terms.row_loss(st, self.softplus, t2)
        if self.mode.terms.sparse_entropy and p.target_index is not None:
            loss = loss + t2 * sparse_plogp(p.target_index, p.target_value, p.num_classes).to(loss.dtype)
        if p.hard_labels is not None:
            loss = loss - p.hard_weight * self._label_logits().to(loss.dtype)
        if p.z_loss and self.mode.terms.segment_lse:
            lse = st[State.MAX] + torch.log(st[State.SUMEXP])
            loss = loss + p.z_loss * (lse * lse).sum(dim=1)
        if not grads:
            return loss, None
        out: Dict[str, Optional[torch.Tensor]] = {}
        if self.linear:
            out["x"] = None if self.dx is None else self.dx.view_as(p.x).to(p.x.dtype)
            out["weight"] = None if self.dw is None else self.dw.to(p.weight.dtype)
            out["bias"] = None if self.db32 is None else self.db32.to(p.bias.dtype)
        else:
            assert self.dlogits is not None
            out["logits"] = self.dlogits.to(p.logits.dtype)
        if self.scale_kind == ScaleKind.SEGMENT:
            assert coef is not None
            out["scale"] = (coef.to(st.dtype)[:, None] * st[State.R]).sum(dim=0).to(p.scale.dtype)
        elif self.scale_kind == ScaleKind.CLASS and self.dscale is not None:
            out["scale"] = self.dscale.to(p.scale.dtype)
        return loss, out


def _coalesced(target_index: torch.Tensor, target_value: torch.Tensor, num_classes: int):
    """(rows, classes, summed values) of the positive sums of sparse targets (duplicates add up; padding, indices
    outside [0, V) and values summing to 0 or less dropped)."""
    B, K = target_index.shape
    idx = target_index.long()
    valid = (idx >= 0) & (idx < num_classes)
    keys = (torch.arange(B, device=idx.device)[:, None] * num_classes + idx)[valid]
    uniq, inv = torch.unique(keys, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64, device=idx.device)
    sums.index_add_(0, inv, target_value[valid].double())
    pos = sums > 0
    return uniq[pos] // num_classes, uniq[pos] % num_classes, sums[pos]


def sparse_plogp(target_index: torch.Tensor, target_value: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B] sum over each row's classes of z log z of sparse targets (the teacher's negative entropy in KL)."""
    rows, _, v = _coalesced(target_index, target_value, num_classes)
    out = torch.zeros(target_index.shape[0], dtype=torch.float64, device=target_index.device)
    return out.index_add_(0, rows, v * torch.log(v))


def _sparse_teacher(p, seg_of_class: torch.Tensor):
    """Sparse top-K teacher probabilities as the logits of a dense teacher (reference.teacher_log_probs): per (row,
    segment) log of the tail probability max(1 - mass, TAIL_MIN) / (classes outside the top K); the given classes'
    log values. Returns (tail [B, G] fp32, rows, classes, log values) of which the driver fills each chunk (times T;
    the teacher's softmax normalises)."""
    from kc_kernels.reference import TAIL_MIN

    B, G = p.batch, p.num_segments
    rows, cls, v = _coalesced(p.target_index, p.target_value, p.num_classes)
    seg = seg_of_class.long()[cls]
    flat = rows * G + seg
    mass = torch.zeros(B * G, dtype=torch.float64, device=rows.device).index_add_(0, flat, v)
    given = torch.zeros(B * G, dtype=torch.float64, device=rows.device).index_add_(0, flat, torch.ones_like(v))
    sizes = torch.tensor([p.bounds[g + 1] - p.bounds[g] for g in range(G)], dtype=torch.float64,
                         device=rows.device).repeat(B)
    outside = (sizes - given).clamp(min=1)
    tail = torch.log((1 - mass).clamp(min=TAIL_MIN) / outside).view(B, G).float()
    return tail, rows, cls, torch.log(v).float()


def row_coef(p, device, dtype, grad_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weight of each row's gradient: sample weight x reduction factor (x the incoming gradient for "none")."""
    coef = row_weights(p.sample_weight, p.batch, p.reduction, dtype, device)
    if grad_rows is not None:
        coef = coef * grad_rows.to(dtype)
    return coef


def reduce_rows(loss_rows: torch.Tensor, p) -> torch.Tensor:
    sw = None if p.sample_weight is None else p.sample_weight.detach()
    return reduce_loss(loss_rows, sw, p.reduction)
