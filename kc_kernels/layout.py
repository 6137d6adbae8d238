"""The layout of a chunked walk over the classes: the epilogue's phases, state rows and constants (the same
enums as csrc/common/soft_target_layout.h, checked by ``check_layout``), and the plan of chunks of one segment
layout (docs/epilogue.md).

Chunks hold whole segments whenever a segment fits, so statistics over a segment (softmax log-sum-exp, the
self-paced L2 norm and its gradient term) are complete inside one epilogue call. A segment longer than a chunk is
one step of several sub-chunks, which the driver walks in row blocks (or, for given logits, once per phase).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import torch


class Phase(IntFlag):
    """Phases of an epilogue call (a bitmask); a call runs them in the order TEACHER, NORM, STATS, MIX, FINAL
    (docs/epilogue.md)."""

    TEACHER = 1  # a dense softmax teacher's log-sum-exp
    NORM = 2  # the self-paced norm
    STATS = 4  # statistics that need the norm and the teacher's log-sum-exp
    FINAL = 8  # loss sums and, with a coefficient, the logit gradient
    MIX = 16  # JSD: sums over the mixture M, which need STATS' log-sum-exp (runs after STATS, before FINAL)


class State(IntEnum):
    """Rows of the [NUM_STATES, B, G] statistics (csrc/common/soft_target_layout.h says what each sums)."""

    SUMSQ = 0
    MAX = 1
    SUMEXP = 2
    SUMEXP_U = 3
    SUMEXP_Y = 4
    ZSUM = 5
    ZY = 6
    ZU = 7
    ZYH = 8
    TMAX = 9
    TSUMEXP = 10
    R = 11
    S = 12
    TENT = 13  # dense teacher: sum exp(t/T - TMAX) t/T, merged as TSUMEXP (the teacher's entropy)
    DIV = 14  # reverse KL: sum exp(y - MAX) (y - t/T), merged as SUMEXP; JSD: sum p log(p / M) (MIX)
    DLOSS = 15  # JSD: the divergence summed over the segment (MIX)


class Const(IntEnum):
    """Planes of the [NUM_CONSTS, B, G] constants a GPU FINAL reads."""

    INV_NT = 0
    LSE = 1
    MASS = 2
    TLSE = 3
    S_N2 = 4
    DBAR = 5  # reverse KL: DIV / SUMEXP; JSD: DIV


class ScaleKind(IntEnum):
    """How the self-paced scale is indexed."""

    NONE = 0
    SEGMENT = 1
    CLASS = 2


NUM_STATES = len(State)
NUM_CONSTS = len(Const)
NORM_EPS = 1e-12  # n = sqrt(sum u^2 + eps), as kc::kNormEps (checked against the extensions)
MIN_CHUNK = 256
ROW_ALIGN_BYTES = 64
HALF_ADD_BLOCKS = 4  # row blocks whose half-precision dW may be summed in place (one rounding each)


def padded_row_stride(cols: int, itemsize: int) -> int:
    """Row stride (in elements) for rows of ``cols`` values: an odd number of 64-byte lines. Whole lines, because
    BLAS runs measurably slower on unaligned leading dimensions; an odd count, because a stride of a power of two
    bytes (a 16384-class chunk in fp32 is 64 KiB a row) maps the rows onto the same cache sets (measured:
    docs/performance.md)."""
    per_line = max(1, ROW_ALIGN_BYTES // itemsize)
    lines = -(-cols // per_line)
    return (lines + 1 - lines % 2) * per_line


def check_layout(lib, name: str) -> None:
    """The compiled kernels of ``lib`` index states, consts, phases, scale kinds and loss modes by their own enums
    (exported from the X-macro lists of csrc/common): they must be the IntEnums here, or the extension is stale."""
    from kc_kernels.loss_modes import LossMode

    pairs = [(lib.STATES, State), (lib.CONSTS, Const), (lib.PHASES, Phase), (lib.SCALE_KINDS, ScaleKind),
             (lib.LOSS_MODES, LossMode)]
    wrong = [f"{enum.__name__}.{key}" for table, enum in pairs
             for key in set(table) | set(enum.__members__) if table.get(key) != getattr(enum, key, None)]
    if wrong or lib.NUM_STATES != NUM_STATES or lib.NUM_CONSTS != NUM_CONSTS or lib.NORM_EPS != NORM_EPS:
        raise ImportError(f"{name} was built for another epilogue layout than kc_kernels.layout "
                          f"(differing: {wrong or 'NUM_STATES/NUM_CONSTS/NORM_EPS'}); rebuild the extension")


@dataclass(frozen=True)
class Chunk:
    lo: int  # global classes [lo, hi)
    hi: int
    piece_lo: Tuple[int, ...]  # local bounds of the segment pieces inside the chunk
    piece_seg: Tuple[int, ...]
    whole: bool  # every piece is a whole segment: all phases run in one pass


class Plan:
    """The chunks of one segment layout and capacity, with their piece tables on each device they were asked for.

    ``steps`` is a list whose items are either [one chunk of whole segments] or the list of sub-chunks of one
    segment longer than the capacity. With grouped x, a chunk never spans two segments (each reads its own x).
    Plans are cached per layout, so the tables are built and copied to the device once, not in every call."""

    def __init__(self, bounds: Tuple[int, ...], capacity: int, grouped: bool):
        self.bounds = bounds
        self.steps = _plan_steps(list(bounds), capacity, grouped)
        self._tables: Dict[Tuple[Chunk, str, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}
        self._seg_of_class: Dict[str, torch.Tensor] = {}

    def tables(self, c: Chunk, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (c, str(device), dtype)
        if key not in self._tables:
            self._tables[key] = (torch.tensor(c.piece_lo, dtype=dtype).to(device),
                                 torch.tensor(c.piece_seg, dtype=dtype).to(device))
        return self._tables[key]

    def seg_of_class(self, device: torch.device) -> torch.Tensor:
        """int32 [V]: the segment of every class."""
        key = str(device)
        if key not in self._seg_of_class:
            b = torch.tensor(self.bounds, dtype=torch.int64)
            seg = torch.repeat_interleave(torch.arange(len(b) - 1, dtype=torch.int32), b[1:] - b[:-1])
            self._seg_of_class[key] = seg.to(device)
        return self._seg_of_class[key]


def _plan_steps(bounds, capacity: int, grouped: bool):
    steps = []
    cur_lo, pieces, segs = None, [], []

    def flush(end):
        nonlocal cur_lo, pieces, segs
        if cur_lo is not None:
            steps.append([Chunk(cur_lo, end, tuple(p - cur_lo for p in pieces) + (end - cur_lo,), tuple(segs), True)])
        cur_lo, pieces, segs = None, [], []

    for g in range(len(bounds) - 1):
        lo, hi = bounds[g], bounds[g + 1]
        if hi - lo > capacity:
            flush(lo)
            steps.append([Chunk(a, min(a + capacity, hi), (0, min(a + capacity, hi) - a), (g,), False)
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


@lru_cache(maxsize=64)
def plan(bounds: Tuple[int, ...], capacity: int, grouped: bool) -> Plan:
    return Plan(bounds, capacity, grouped)


def plan_chunks(bounds: Sequence[int], capacity: int, grouped: bool) -> List[List[Chunk]]:
    """The steps of a layout (see Plan); kept as a function for tests and tools."""
    return plan(tuple(bounds), capacity, grouped).steps
