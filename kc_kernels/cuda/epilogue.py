"""CUDA epilogue of the chunked driver: the launchers of csrc/cuda/soft_target.cu (contract: docs/epilogue.md,
"GPU epilogue").

- ``row_stats``: one block per (row, segment piece) folds the piece into ``states[:, row, piece_seg]`` (TEACHER,
  NORM, STATS, and JSD's MIX after them).
- ``mix``: JSD's MIX alone (the sums over the mixture), once a segment's STATS and TEACHER are complete; it reads
  the log-sums-exp from ``consts`` when the driver has filled them, else from the states.
- ``final``: one block per [BLOCK_R, BLOCK_C] tile: loss row sums per column tile into ``row_part``; with ``coef``
  the logit gradient over S in place and the bias / per-class scale column sums per row tile into ``col_part``.

Both compute in fp32 for fp32 / fp16 / bf16 scores and any float teacher dtype, without atomics (the same inputs
give the same bits). Launches go to torch's current stream of the states' device; nothing here synchronises. The checks
below are on shapes, dtypes and strides only (host metadata): a buffer of the wrong layout would otherwise be read
or written out of bounds.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from kc_kernels import _cuda, layout
from kc_kernels.gpu_epilogue import DeviceEpilogue, EpilogueArgs
from kc_kernels.layout import NUM_CONSTS, NUM_STATES, Phase

__all__ = ["TILE", "row_stats", "mix", "final", "EPILOGUE"]

TILE = tuple(_cuda.TILE)  # (BLOCK_R, BLOCK_C) of the final kernel: the driver sizes row_part and col_part with it

_DTYPES = {torch.float32: _cuda.DTYPES["float32"], torch.float16: _cuda.DTYPES["float16"],
           torch.bfloat16: _cuda.DTYPES["bfloat16"], torch.float64: _cuda.DTYPES["float64"]}
_WORK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


layout.check_layout(_cuda, "kc_kernels._cuda")


def _fail(name: str, why: str):
    raise ValueError(f"cuda epilogue: {name} {why}")


def _address(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _expect(name: str, t: torch.Tensor, dtype: torch.dtype, shape=None, contiguous: bool = True):
    if t.dtype != dtype:
        _fail(name, f"must be {dtype}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        _fail(name, f"must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        _fail(name, "must be contiguous")


def _rows_view(name: str, t: torch.Tensor, rows: int):
    """A [rows, n] view whose columns are contiguous (the kernels take a row stride only)."""
    if t.dim() != 2 or t.shape[0] != rows or (t.shape[1] > 1 and t.stride(1) != 1):
        _fail(name, f"must be a [{rows}, n] view with contiguous columns, got shape {tuple(t.shape)} "
                    f"strides {t.stride()}")


def _fill_inputs(p, a: EpilogueArgs):
    """The fields both kernels read."""
    p.col0, p.rows, p.ncols, p.num_segments = a.col0, a.rows, a.ncols, a.num_segments
    if a.S is not None:  # absent in a TEACHER-only call, made before the chunk's GEMM
        _rows_view("S", a.S, a.rows)
        if a.S.dtype not in _WORK_DTYPES:
            _fail("S", f"must be float32, float16 or bfloat16, got {a.S.dtype}")
        p.scores_row_stride = a.S.stride(0)
        p.scores_dtype = _DTYPES[a.S.dtype]
    for name in ("scale", "bias"):
        t = getattr(a, name)
        if t is not None:
            _expect(name, t, torch.float32)
    p.scale, p.bias = _address(a.scale), _address(a.bias)
    p.mode, p.inv_t = int(a.mode), float(a.inv_t)
    p.beta, p.softcap, p.uniform_target = float(a.beta), float(a.softcap or 0.0), float(a.uniform_target)
    if a.teacher is not None:
        _rows_view("teacher", a.teacher, a.rows)
        if a.teacher.dtype not in _DTYPES:
            _fail("teacher", f"must be a float tensor, got {a.teacher.dtype}")
        tcol0 = _teacher_col0(a)
        if a.teacher.shape[1] < tcol0 + a.ncols:
            _fail("teacher", f"has {a.teacher.shape[1]} columns; the chunk reads columns [{tcol0}, "
                             f"{tcol0 + a.ncols})")
        p.teacher, p.teacher_row_stride, p.teacher_dtype = a.teacher.data_ptr(), a.teacher.stride(0), \
            _DTYPES[a.teacher.dtype]
        p.teacher_col0 = tcol0
    elif a.tidx is not None and a.tidx.shape[1] > 0:
        K = a.tidx.shape[1]
        _expect("tidx", a.tidx, torch.int32, (a.rows, K))
        _expect("tval", a.tval, torch.float32, (a.rows, K))
        p.target_index, p.target_value = a.tidx.data_ptr(), a.tval.data_ptr()
        p.num_targets, p.targets_row_stride = K, K


def _teacher_col0(a: EpilogueArgs) -> int:
    """The teacher's column of the chunk's first class: col0 for the full dense teacher, 0 for a chunk's teacher."""
    return a.col0 if a.teacher_col0 is None else int(a.teacher_col0)


def _device(a: EpilogueArgs) -> torch.device:
    return a.states.device


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def row_stats(a: EpilogueArgs, phases: int) -> None:
    """Fold the chunk's pieces into ``a.states`` for the requested phases (TEACHER | NORM | STATS | MIX, run in that
    order). MIX (JSD) reads the log-sums-exp from ``a.consts`` when given and the call holds neither TEACHER nor
    STATS, else from the states."""
    teacher_phase = bool(phases & Phase.TEACHER) and a.mode.terms.teacher_lse and a.teacher is not None
    if not a.mode.terms.mix:
        phases &= ~Phase.MIX
    if not (teacher_phase or phases & (Phase.NORM | Phase.STATS | Phase.MIX)) or a.rows == 0 or a.pieces == 0:
        return
    p = _cuda.RowStatsParams()
    _fill_inputs(p, a)
    _expect("piece_lo", a.piece_lo, torch.int32, (a.pieces + 1,))
    _expect("piece_seg", a.piece_seg, torch.int32, (a.pieces,))
    _expect("states", a.states, torch.float32, (NUM_STATES, a.rows, a.num_segments), contiguous=False)
    if phases & (Phase.NORM | Phase.STATS | Phase.MIX) and a.S is None:
        _fail("S", "is required by NORM, STATS and MIX")
    if phases & Phase.MIX and a.teacher is None:
        _fail("teacher", "is required by MIX")
    p.scores, p.pieces = _address(a.S), a.pieces
    p.piece_lo, p.piece_seg = a.piece_lo.data_ptr(), a.piece_seg.data_ptr()
    p.states = a.states.data_ptr()
    p.state_stride, p.state_row_stride, p.state_segment_stride = a.states.stride()
    p.phases = int(phases)
    if phases & Phase.MIX and a.consts is not None:
        _expect("consts", a.consts, torch.float32, (NUM_CONSTS, a.rows, a.num_segments))
        p.consts = a.consts.data_ptr()
    with torch.cuda.device(_device(a)):
        p.stream = _stream(_device(a))
        _cuda.soft_target_row_stats(p)


def mix(a: EpilogueArgs) -> None:
    """JSD's MIX over the chunk's pieces: DLOSS and DIV of ``a.states`` from the finished log-sums-exp."""
    row_stats(a, Phase.MIX)


def final(a: EpilogueArgs) -> None:
    """Loss row sums per column tile into ``a.row_part``; with ``a.coef`` the gradient over ``a.S`` and the bias /
    per-class scale column sums per row tile into ``a.col_part``."""
    if a.rows == 0 or a.ncols == 0:
        return
    if a.S is None:
        _fail("S", "is required by FINAL")
    block_r, block_c = TILE
    n_row_tiles, n_col_tiles = -(-a.rows // block_r), -(-a.ncols // block_c)
    p = _cuda.FinalParams()
    _fill_inputs(p, a)
    _expect("seg_of_class", a.seg_of_class, torch.int32)
    _expect("consts", a.consts, torch.float32, (NUM_CONSTS, a.rows, a.num_segments))
    _expect("row_part", a.row_part, torch.float32, (2, n_col_tiles, a.rows))
    p.scores, p.seg_of_class, p.consts = a.S.data_ptr(), a.seg_of_class.data_ptr(), a.consts.data_ptr()
    p.row_part, p.t2 = a.row_part.data_ptr(), float(a.t2)
    if a.coef is not None:
        _expect("coef", a.coef, torch.float32, (a.rows,))
        p.coef = a.coef.data_ptr()
        if a.col_part is not None and (a.want_dbias or a.want_dscale):
            _expect("col_part", a.col_part, torch.float32, (2, n_row_tiles, a.ncols))
            p.col_part, p.want_dbias, p.want_dscale = a.col_part.data_ptr(), bool(a.want_dbias), bool(a.want_dscale)
    with torch.cuda.device(_device(a)):
        p.stream = _stream(_device(a))
        _cuda.soft_target_final(p)


EPILOGUE = DeviceEpilogue(sys.modules[__name__])  # the driver's interface over the kernels above
