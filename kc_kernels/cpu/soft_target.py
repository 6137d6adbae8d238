"""CPU backend of the (linear +) soft-target loss: the chunked driver (kc_kernels/chunked.py) with a C++/OpenMP
epilogue (csrc/cpu/soft_target.cpp).

Per chunk of classes: one BLAS GEMM for the raw scores, one pass of the fused C++ epilogue that accumulates the
loss statistics and overwrites the scores with the scaled logit gradient, then the gradient GEMMs. The work dtype
is fp32 (half inputs are converted per weight chunk; fp64 is computed in fp32 with fp64 statistics). Peak extra
memory: the [B, chunk] buffer (chunk chosen from ``memory_budget``, default 64 MiB), fp32 copies of x and of one
weight chunk for half inputs, a converted teacher chunk for half teacher logits, and O(B * G) statistics.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from kc_kernels import _C, chunked
from kc_kernels.chunked import Chunk, PHASE_FINAL, SCALE_CLASS
from kc_kernels.ops.soft_target import SoftTargetProblem

DEFAULT_MEMORY_BUDGET = 64 << 20  # bytes for the chunk of logits (and of teacher logits)


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


class CpuEpilogue:
    """The C++ epilogue behind the driver's interface: ``work_dtype``, ``state_dtype``, ``bytes_per_class``,
    ``prepare`` (once per walk) and ``run`` (one chunk, one block of rows, some phases)."""

    state_dtype = torch.float64

    @staticmethod
    def work_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float32

    @staticmethod
    def bytes_per_class(sw) -> int:
        p = sw.p
        # the logits chunk, a converted teacher chunk, fp32 weight/gradient rows of half weights
        per_col = 4 * p.batch * (2 if (p.teacher_logits is not None and p.teacher_logits.dtype != torch.float32)
                                 else 1)
        if sw.linear and p.weight.dtype != torch.float32:
            per_col += 8 * sw.H
        return per_col

    @staticmethod
    def prepare(sw):
        p = sw.p
        sw.sparse = p.target_index is not None
        if sw.sparse:
            sw.tidx = p.target_index.long().contiguous()
            sw.tval = p.target_value.float().contiguous()
        sw.teacher = p.teacher_logits
        sw.tbuf = None
        if sw.teacher is not None:
            if sw.teacher.dtype == torch.float32:
                sw.teacher = sw.teacher.contiguous()
            else:
                sw.tbuf = torch.empty(p.batch * sw.capacity, dtype=torch.float32)

    @staticmethod
    def _teacher(sw, c: Chunk, r0: int, r1: int):
        """(address, row stride, converted copy or None) of the teacher logits of the chunk's classes from row r0
        on, as fp32; the caller keeps the copy alive until the kernel has read it."""
        if sw.teacher is None:
            return 0, 0, None
        if sw.tbuf is None:  # fp32 teacher: read in place
            return sw.teacher.data_ptr() + 4 * (c.lo + r0 * sw.teacher.shape[1]), sw.teacher.shape[1], None
        n = (r1 - r0) * (c.hi - c.lo)
        t = (sw.tbuf[:n] if n <= sw.tbuf.numel() else torch.empty(n)).view(r1 - r0, c.hi - c.lo)
        t.copy_(sw.teacher[r0:r1, c.lo:c.hi])
        return t.data_ptr(), t.shape[1], t

    @classmethod
    def run(cls, sw, c: Chunk, u: Optional[torch.Tensor], phases: int, coef: Optional[torch.Tensor],
            rows: Optional[Tuple[int, int]]):
        """One epilogue call; ``rows`` = (r0, r1): ``u`` holds only those rows (the row-block walk of a long
        segment)."""
        p = sw.p
        r0, r1 = rows if rows is not None else (0, p.batch)
        state = sw.state if rows is None else sw.state[:, r0:r1].contiguous()
        lo_t, seg_t = sw.plan.tables(c, torch.device("cpu"), torch.long)
        tptr, tld, _teacher_copy = cls._teacher(sw, c, r0, r1)
        dsc = dbias = 0
        if coef is not None and sw.dscale is not None and phases & PHASE_FINAL:
            dsc = sw.dscale.data_ptr() + 4 * c.lo
        if coef is not None and sw.db32 is not None and phases & PHASE_FINAL:
            dbias = sw.db32.data_ptr() + 4 * c.lo
        K = sw.tidx.shape[1] if sw.sparse else 0
        ld = u.stride(0) if u is not None else c.hi - c.lo
        _C.soft_target_chunk(
            _ptr(u), ld, r1 - r0, c.hi - c.lo, c.lo, len(c.piece_seg), lo_t.data_ptr(), seg_t.data_ptr(),
            sw.G, phases, int(sw.softmax), 1.0 / p.temperature, p.temperature ** 2, _ptr(sw.scale32),
            sw.scale_kind, _ptr(sw.tidx) + 8 * K * r0 if sw.sparse else 0,
            _ptr(sw.tval) + 4 * K * r0 if sw.sparse else 0, K, tptr, tld,
            _ptr(coef) + 4 * r0 if coef is not None else 0, state.data_ptr(), sw.softplus.data_ptr() + 8 * r0, dsc,
            _ptr(sw.bias32), dbias)
        if rows is not None:
            sw.state[:, r0:r1] = state


EPILOGUE = CpuEpilogue()


def linear_soft_target_loss(p: SoftTargetProblem) -> torch.Tensor:
    return chunked.linear_soft_target_loss(p, EPILOGUE, p.memory_budget or DEFAULT_MEMORY_BUDGET)


def soft_target_loss(p: SoftTargetProblem) -> torch.Tensor:
    return chunked.soft_target_loss(p, EPILOGUE, p.memory_budget or DEFAULT_MEMORY_BUDGET)
