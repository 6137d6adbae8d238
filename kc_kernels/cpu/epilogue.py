"""The cpu backend's epilogue of the chunked driver (kc_kernels/driver.py): the C++/OpenMP loops of
csrc/cpu/soft_target_impl.h (compiled in csrc/cpu/soft_target.cpp and, for bf16 scores, soft_target_bf16.cpp).

Per chunk of classes: one BLAS GEMM for the raw scores, one pass of the fused C++ epilogue that accumulates the
loss statistics and overwrites the scores with the scaled logit gradient, then the gradient GEMMs. The work dtype
is fp32 (fp16 inputs are converted per weight chunk; fp64 is computed in fp32 with fp64 statistics), except for
bf16 inputs on a CPU with native bf16 (AVX512-BF16 or AMX, see ``bf16_enabled``): then the GEMMs run in bf16 (fp32
accumulation inside BLAS, bf16 scores) and the epilogue reads bf16 scores, computes in fp32 and writes the logit
gradient back in bf16. Peak extra memory: the [B, chunk] buffer (chunk chosen from ``memory_budget``, default
64 MiB), fp32 copies of x and of one weight chunk for converted inputs, a converted teacher chunk for non-fp32
teacher logits, and O(B * G) statistics.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional, Tuple

import torch

from kc_kernels import _C, layout
from kc_kernels.driver import Epilogue, Sweep
from kc_kernels.layout import Chunk, Phase
from kc_kernels.ops import checks

layout.check_layout(_C, "kc_kernels._C")


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


BF16_ENV = "KC_CPU_BF16"


@lru_cache(maxsize=1)
def _native_bf16() -> bool:
    return bool(_C.native_bf16())


def bf16_enabled() -> bool:
    """Whether bf16 inputs run the bf16 path (bf16 GEMMs and scores). ``KC_CPU_BF16``: unset or "auto" = where the
    CPU has native bf16 (``_C.native_bf16()``: AVX512-BF16 or AMX-BF16; elsewhere bf16 GEMMs are emulated and slower
    than fp32 ones); "0" = never (inputs converted to fp32 per chunk, as for fp16); "1" = always (also where bf16 is
    emulated: same results, for tests)."""
    mode = os.environ.get(BF16_ENV, "auto").strip().lower()
    if mode in ("", "auto"):
        return _native_bf16()
    if mode in ("0", "1"):
        return mode == "1"
    raise ValueError(f"{BF16_ENV}: must be 0, 1 or auto, got {mode!r}")


_SCORES_DTYPES = {torch.float32: _C.SCORES_DTYPES["F32"], torch.bfloat16: _C.SCORES_DTYPES["BF16"]}


class CpuEpilogue:
    """The C++ epilogue behind the driver's interface (kc_kernels.driver.Epilogue): sizes and dtypes here,
    ``begin`` gives the object that holds one walk's inputs and runs the kernel (``CpuWalk``)."""

    state_dtype = torch.float64
    default_memory_budget = 64 << 20  # bytes for the chunk of logits (and of teacher logits), at least
    # and up to the weight gradient's bytes: a flat softmax over 100K classes runs at 1.25x its floor at 64 MiB and
    # 1.16x at 256 MiB (docs/performance.md, "The flat softmax: memory against speed")
    budget_grows_to_weight_grad = True
    # column chunks of at most 16 MiB: the chunk the logits GEMM writes is still in cache when the epilogue and the
    # gradient GEMMs read it (measurements: docs/performance.md)
    chunk_bytes: Optional[int] = 16 << 20
    # the teacher phase runs in the same call as STATS and FINAL where a call holds whole segments (one read of a
    # dense teacher, while its rows are in cache; its exps are kept for the targets)
    fuses_teacher = True

    @staticmethod
    def work_dtype(dtype: torch.dtype) -> torch.dtype:
        """The dtype of the GEMMs and of the scores buffer: bf16 for bf16 inputs where ``bf16_enabled()``, else
        fp32. (The linear op requires x and weight of one dtype, so bf16 x means bf16 weight.)"""
        return torch.bfloat16 if dtype == torch.bfloat16 and bf16_enabled() else torch.float32

    @staticmethod
    def bytes_per_class(sw: "Sweep") -> int:
        p = sw.p
        # the logits chunk (work dtype), a converted teacher chunk, fp32 weight/gradient rows of converted weights
        per_col = sw.buf_itemsize * p.batch
        if p.teacher_logits is not None and p.teacher_logits.dtype != torch.float32:  # (a head's chunk: the driver)
            per_col += 4 * p.batch
        if sw.linear and p.weight.dtype != sw.work_dtype:
            per_col += 8 * sw.H
        return per_col

    def begin(self, sw: "Sweep") -> "CpuWalk":
        return CpuWalk(sw)


class CpuWalk:
    """One walk's inputs as the kernel reads them (targets as int64/fp32, the teacher as fp32) and its calls."""

    def __init__(self, sw: "Sweep"):
        p = sw.p
        self.tidx = self.tval = None
        if p.target_index is not None and not sw.teacher_from_targets:
            self.tidx = p.target_index.long().contiguous()
            self.tval = p.target_value.float().contiguous()
        self.teacher = p.teacher_logits
        self.tbuf: Optional[torch.Tensor] = None  # fp32 copies of a non-fp32 teacher's chunks
        if self.teacher is not None:
            if self.teacher.dtype == torch.float32:
                self.teacher = self.teacher.contiguous()
            else:
                self.tbuf = torch.empty(p.batch * sw.capacity, dtype=torch.float32)
        self.made_teacher = sw.has_teacher and self.teacher is None  # a head's (or filled) chunks, fp32

    def after_teacher(self, sw: "Sweep") -> None:
        """The teacher phase poisons the log-sum-exp of a segment holding a NaN teacher logit: the front's NaN
        check of the dense teacher (a pass over B x V values) is done here, from the [B, G] statistics."""
        if checks.values_enabled(torch.device("cpu")) and bool(torch.isnan(sw.state[layout.State.TSUMEXP]).any()):
            checks.fail("teacher_logits", "contains NaN")

    def _teacher(self, sw: "Sweep", c: Chunk, r0: int, r1: int) -> Optional[torch.Tensor]:
        """The teacher logits of rows [r0, r1) and the chunk's classes as fp32 with unit column stride: a view of
        an fp32 teacher, else a converted copy (which the caller keeps alive until the kernel has read it)."""
        if self.made_teacher:
            return sw.teacher_chunk(c, r0, r1)
        if self.teacher is None:
            return None
        if self.tbuf is None:  # fp32 teacher: read in place
            return self.teacher[r0:r1, c.lo:c.hi]
        n = (r1 - r0) * (c.hi - c.lo)
        if n > self.tbuf.numel():  # a long segment's row block: grown once
            self.tbuf = torch.empty(n)
        t = self.tbuf[:n].view(r1 - r0, c.hi - c.lo)
        t.copy_(self.teacher[r0:r1, c.lo:c.hi])
        return t

    def run(self, sw: "Sweep", c: Chunk, u: Optional[torch.Tensor], phases: int,
            coef: Optional[torch.Tensor], rows: Optional[Tuple[int, int]]) -> None:
        """One epilogue call; ``rows`` = (r0, r1): ``u`` holds only those rows (the row-block walk of a long
        segment), every other per-row buffer is sliced to them."""
        r0, r1 = rows if rows is not None else (0, sw.p.batch)
        teacher = self._teacher(sw, c, r0, r1)  # a converted copy lives until the kernel has run
        a = self._params(sw, c, u, phases, coef, r0, r1)
        if teacher is not None:
            a.teacher, a.teacher_ld = teacher.data_ptr(), teacher.stride(0)
        _C.soft_target_chunk(a)

    def _params(self, sw: "Sweep", c: Chunk, u: Optional[torch.Tensor], phases: int,
                coef: Optional[torch.Tensor], r0: int, r1: int) -> "_C.SoftTargetChunkParams":
        """The kernel's named arguments (csrc/cpu/kc_cpu.h) for rows [r0, r1) of chunk ``c``: every per-row
        buffer is the slice of those rows, every per-class one the slice of the chunk's classes."""
        p, a = sw.p, _C.SoftTargetChunkParams()
        lo_t, seg_t = sw.plan.tables(c, torch.device("cpu"), torch.long)
        a.u, a.ld = _ptr(u), u.stride(0) if u is not None else c.hi - c.lo
        if u is not None:
            if u.dtype not in _SCORES_DTYPES or u.stride(1) != 1:
                raise ValueError(f"u: the epilogue reads fp32 or bf16 scores with unit column stride, got {u.dtype} "
                                 f"with strides {tuple(u.stride())}")
            a.scores_dtype = _SCORES_DTYPES[u.dtype]
        a.rows, a.ncols, a.col0 = r1 - r0, c.hi - c.lo, c.lo
        a.npieces, a.piece_lo, a.piece_seg, a.num_segments = len(c.piece_seg), lo_t.data_ptr(), seg_t.data_ptr(), sw.G
        a.phases, a.mode, a.inv_t, a.t2 = int(phases), int(sw.mode), 1.0 / p.temperature, p.temperature ** 2
        a.scale, a.scale_kind, a.bias = _ptr(sw.scale32), int(sw.scale_kind), _ptr(sw.bias32)
        # JSD's beta; the options of softmax and kl (the kernel refuses them for another mode)
        a.beta, a.softcap, a.z_loss, a.uniform_target = p.beta, p.softcap or 0.0, p.z_loss, p.uniform_target
        if self.tidx is not None and self.tval is not None:
            a.k = self.tidx.shape[1]
            a.tidx, a.tval = self.tidx[r0:r1].data_ptr(), self.tval[r0:r1].data_ptr()
        state = sw.state[:, r0:r1]
        a.state = state.data_ptr()
        a.state_stride, a.state_row_stride, a.state_segment_stride = state.stride()
        a.softplus_sum = sw.softplus[r0:r1].data_ptr()
        if coef is not None:
            a.coef = coef[r0:r1].data_ptr()
            if phases & Phase.FINAL:
                a.dscale_class = _ptr(None if sw.dscale is None else sw.dscale[c.lo:c.hi])
                a.dbias = _ptr(None if sw.db32 is None else sw.db32[c.lo:c.hi])
        return a


EPILOGUE: Epilogue = CpuEpilogue()
