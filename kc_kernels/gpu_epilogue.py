"""The epilogue of the chunked driver on a GPU, shared by the triton and cuda backends (docs/epilogue.md).

A backend supplies its kernels (``row_stats``, ``mix`` and ``final``, see kc_kernels/triton/epilogue.py and
kc_kernels/cuda/epilogue.py); this module prepares their inputs once per walk (targets sorted per row, the scale
expanded to classes, the segment of every class), picks each call's teacher (the dense teacher logits, or the chunk
of a teacher head or of a filled top-K teacher that the sweep makes), derives the per-(row, segment) constants of
the mix and final kernels from the statistics with a few device ops, and sums the kernels' partial results in a
fixed order. Nothing here reads a device value on the host: no synchronisation in the hot path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

import torch

from kc_kernels.driver import Epilogue, Sweep
from kc_kernels.layout import NORM_EPS, NUM_CONSTS, Chunk, Const, Phase, ScaleKind, State
from kc_kernels.loss_modes import LossMode

WORK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def sorted_targets(target_index: torch.Tensor, target_value: torch.Tensor,
                   num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row's targets sorted by class as int32, with padding and any index outside [0, V) mapped to V (past
    every class, value 0): the kernels never read or write out of bounds, validated or not."""
    idx = target_index.long()
    keep = (idx >= 0) & (idx < num_classes)
    idx = torch.where(keep, idx, torch.full_like(idx, num_classes))
    val = torch.where(keep, target_value.float(), torch.zeros((), dtype=torch.float32, device=idx.device))
    idx, order = torch.sort(idx, dim=1, stable=True)
    return idx.to(torch.int32).contiguous(), val.gather(1, order).contiguous()


@dataclass
class EpilogueArgs:
    """One call of a GPU backend's kernels: one chunk, one block of rows (docs/epilogue.md, "GPU epilogue")."""

    S: Optional[torch.Tensor]
    col0: int
    rows: int
    ncols: int
    pieces: int
    piece_lo: torch.Tensor
    piece_seg: torch.Tensor
    num_segments: int
    seg_of_class: torch.Tensor
    bias: Optional[torch.Tensor]
    scale: Optional[torch.Tensor]
    teacher: Optional[torch.Tensor]
    tidx: Optional[torch.Tensor]
    tval: Optional[torch.Tensor]
    states: torch.Tensor
    consts: Optional[torch.Tensor]
    coef: Optional[torch.Tensor]
    mode: LossMode
    inv_t: float
    t2: float
    row_part: Optional[torch.Tensor]
    col_part: Optional[torch.Tensor]
    want_dbias: bool
    want_dscale: bool
    # the teacher's column of class col0: None = col0 (``teacher`` is the full dense teacher, indexed from class 0);
    # 0 when ``teacher`` is the chunk's own [rows, ncols] logits (a teacher head's, or a filled top-K teacher's)
    teacher_col0: Optional[int] = None
    beta: float = 0.5  # JSD: M = beta z + (1 - beta) p, beta in (0, 1)
    softcap: float = 0.0  # SOFTMAX/KL without a scale: y = softcap tanh((u + bias) / softcap) / T; 0 = off
    uniform_target: float = 0.0  # SOFTMAX/KL without a scale: added to every class's target z_j; 0 = off


class DeviceEpilogue:
    """The driver's epilogue interface (kc_kernels.driver.Epilogue) over a backend's two kernels."""

    state_dtype = torch.float32
    default_memory_budget = 512 << 20  # bytes of the [B, chunk] scores buffer and the partial sums on a GPU
    budget_grows_to_weight_grad = False
    chunk_bytes: Optional[int] = None
    fuses_teacher = False

    def __init__(self, kernels):
        self.k = kernels

    @staticmethod
    def work_dtype(dtype: torch.dtype) -> torch.dtype:
        # half inputs keep their dtype: the GEMMs run on tensor cores, the epilogue computes in fp32
        return dtype if dtype in WORK_DTYPES else torch.float32

    def bytes_per_class(self, sw: "Sweep") -> int:
        rows_tile = self.k.TILE[0]
        partial = 8 * -(-sw.p.batch // rows_tile)  # the column partial sums of the final kernel
        return sw.p.batch * torch.empty((), dtype=sw.work_dtype).element_size() + partial

    def begin(self, sw: "Sweep") -> "DeviceWalk":
        return DeviceWalk(self.k, sw)


class DeviceWalk:
    """One walk's kernel inputs, prepared once (targets sorted per row, the scale expanded to classes, the segment
    of every class, the final kernel's constants), and its kernel calls."""

    def __init__(self, kernels, sw: "Sweep"):
        p = sw.p
        self.k = kernels
        options = [name for name, v in (("softcap", p.softcap), ("z_loss", p.z_loss),
                                        ("uniform_target", p.uniform_target)) if v]
        if options and (sw.mode not in (LossMode.SOFTMAX, LossMode.KL) or sw.scale_kind != ScaleKind.NONE):
            raise ValueError(f"{options[0]}: an option of the modes softmax and kl without a scale, not of mode "
                             f"{sw.mode.name.lower()}{' with a scale' if sw.scale_kind != ScaleKind.NONE else ''}")
        self.tidx = self.tval = None
        if p.target_index is not None and not sw.teacher_from_targets:  # else the sweep fills them in as a teacher
            self.tidx, self.tval = sorted_targets(p.target_index, p.target_value, p.num_classes)
        self.teacher = None
        if p.teacher_logits is not None:
            t = p.teacher_logits
            self.teacher = t if t.stride(1) == 1 else t.contiguous()
        # a teacher head's or a filled top-K teacher's logits exist per chunk only (Sweep.teacher_chunk)
        self.made_teacher = sw.has_teacher and self.teacher is None
        self.seg_of_class = sw.plan.seg_of_class(sw.device)
        self.scale_cls = None
        if sw.scale_kind != ScaleKind.NONE:
            assert sw.scale32 is not None
            self.scale_cls = (sw.scale32[self.seg_of_class.long()] if sw.scale_kind == ScaleKind.SEGMENT
                              else sw.scale32).contiguous()
        self.consts = torch.zeros(NUM_CONSTS, p.batch, sw.G, dtype=torch.float32, device=sw.device)

    def after_teacher(self, sw: "Sweep") -> None:
        pass  # a NaN teacher is checked by the front (KC_CHECK_VALUES), not from these statistics

    def _consts(self, sw: "Sweep", r0: int, r1: int, g0: int, g1: int) -> None:
        """Constants of the final kernel for rows [r0, r1) and segments [g0, g1) from the finished statistics;
        also stores R and S (the scale's gradient terms) in the states. Computed in float64 (B x G numbers): the
        gradient under a scale is a difference of two terms that cancel for short segments, so 1/n and S/n^2 are
        rounded once, from exact inputs."""
        st = sw.state[:, r0:r1, g0:g1].double()
        cs = torch.empty(NUM_CONSTS, r1 - r0, g1 - g0, dtype=torch.float64, device=sw.device)
        inv_t = 1.0 / sw.p.temperature
        t2 = sw.p.temperature ** 2
        scaled = sw.scale_kind != ScaleKind.NONE
        if scaled:
            sq = st[State.SUMSQ] + NORM_EPS
            cs[Const.INV_NT] = inv_t / torch.sqrt(sq)
        else:
            cs[Const.INV_NT] = inv_t
        cs[Const.LSE:] = 0
        terms = sw.mode.terms
        if terms.segment_lse:
            lse = st[State.MAX] + torch.log(st[State.SUMEXP])
            cs[Const.LSE] = lse
            cs[Const.MASS] = st[State.ZSUM]
            if sw.p.z_loss:  # z_loss lse^2 per segment: its gradient 2 z_loss lse p_j is the mass's share of q
                cs[Const.MASS] += 2.0 * sw.p.z_loss * lse / t2
            if sw.has_teacher:
                cs[Const.TLSE] = st[State.TMAX] + torch.log(st[State.TSUMEXP])
            cs[Const.DBAR] = terms.dbar(st)
        if scaled:
            R, S = sw.mode.terms.scale_grad_terms(st, t2)
            sw.state[State.R, r0:r1, g0:g1] = R
            sw.state[State.S, r0:r1, g0:g1] = S
            cs[Const.S_N2] = S / sq
        self.consts[:, r0:r1, g0:g1] = cs

    def _teacher(self, sw: "Sweep", c: Chunk, r0: int, r1: int) -> Tuple[Optional[torch.Tensor], Optional[int]]:
        """(teacher, teacher_col0) of rows [r0, r1) of chunk ``c``: the dense teacher's rows (class j at column j),
        or the chunk's logits the sweep makes (column 0 = class c.lo; a buffer the next chunk reuses: the kernels
        read it first, in stream order)."""
        if self.made_teacher:
            return sw.teacher_chunk(c, r0, r1), 0
        if self.teacher is not None:
            return self.teacher[r0:r1], c.lo
        return None, None

    def _set_consts(self, sw: "Sweep", a: EpilogueArgs, c: Chunk, rows: Optional[Tuple[int, int]], r0: int,
                    r1: int) -> None:
        g0, g1 = c.piece_seg[0], c.piece_seg[-1] + 1
        self._consts(sw, r0, r1, g0, g1)
        a.consts = self.consts[:, r0:r1].contiguous() if rows is not None else self.consts

    def run(self, sw: "Sweep", c: Chunk, u: Optional[torch.Tensor], phases: int, coef: Optional[torch.Tensor],
            rows: Optional[Tuple[int, int]]) -> None:
        """The phases of one call in their order: TEACHER, NORM, STATS (the row_stats kernel), the constants, MIX
        (the mix kernel; then the constants again, DBAR needing its sums), FINAL."""
        p = sw.p
        r0, r1 = rows if rows is not None else (0, p.batch)
        n = r1 - r0
        piece_lo, piece_seg = sw.plan.tables(c, sw.device, torch.int32)
        want_dbias = coef is not None and sw.db32 is not None
        want_dscale = coef is not None and sw.dscale is not None
        mix = bool(phases & Phase.MIX) and sw.mode.terms.mix
        teacher, teacher_col0 = self._teacher(sw, c, r0, r1) if phases & ~Phase.NORM else (None, None)
        a = EpilogueArgs(
            S=u, col0=c.lo, rows=n, ncols=c.hi - c.lo, pieces=len(c.piece_seg), piece_lo=piece_lo,
            piece_seg=piece_seg, num_segments=sw.G, seg_of_class=self.seg_of_class, bias=sw.bias32,
            scale=self.scale_cls, teacher=teacher,
            tidx=None if self.tidx is None else self.tidx[r0:r1], tval=None if self.tval is None else self.tval[r0:r1],
            states=sw.state[:, r0:r1], consts=None, coef=None if coef is None else coef[r0:r1],
            mode=sw.mode, inv_t=1.0 / p.temperature, t2=p.temperature ** 2, row_part=None, col_part=None,
            want_dbias=want_dbias, want_dscale=want_dscale, teacher_col0=teacher_col0, beta=float(p.beta),
            softcap=float(p.softcap or 0.0), uniform_target=float(p.uniform_target))
        stat_phases = phases & (Phase.TEACHER | Phase.NORM | Phase.STATS)
        if stat_phases:
            self.k.row_stats(a, stat_phases)
        if mix:
            self._set_consts(sw, a, c, rows, r0, r1)  # LSE and TLSE of the finished statistics
            self.k.mix(a)
        if not phases & Phase.FINAL:
            return
        self._set_consts(sw, a, c, rows, r0, r1)
        br, bc = self.k.TILE
        a.row_part = torch.empty(2, -(-a.ncols // bc), n, dtype=torch.float32, device=sw.device)
        if want_dbias or want_dscale:
            a.col_part = torch.empty(2, -(-n // br), a.ncols, dtype=torch.float32, device=sw.device)
        self.k.final(a)
        if not sw.mode.terms.segment_lse:
            # sigmoid: the final kernel's row sums are the loss; z y comes from it unless STATS counted it already
            rp = a.row_part.sum(dim=1)
            sw.softplus[r0:r1] += rp[0] if sw.scale_kind != ScaleKind.NONE else rp[0] - rp[1]
        if want_dbias and sw.db32 is not None and a.col_part is not None:
            sw.db32[c.lo:c.hi] += a.col_part[0].sum(dim=0)
        if want_dscale and sw.dscale is not None and a.col_part is not None:
            sw.dscale[c.lo:c.hi] += a.col_part[1].sum(dim=0)


if TYPE_CHECKING:
    _conforms: Epilogue = DeviceEpilogue(None)  # the type checker holds DeviceEpilogue to the protocol
