"""The layout of a chunked walk over the classes: the epilogue's phases, state rows and constants (the same
enums as csrc/common/soft_target_layout.h, checked by ``check_layout``), and the plan of chunks of one segment
layout (docs/epilogue.md).

Chunks hold whole segments whenever a segment fits, so statistics over a segment (softmax log-sum-exp, the
self-paced L2 norm and its gradient term) are complete inside one epilogue call. A segment longer than a chunk is
one step of several sub-chunks, which the driver walks in row blocks (or, for given logits, once per phase).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import torch

# phases of an epilogue call (bitmask), state rows and per-(row, segment) constants: docs/epilogue.md
PHASE_TEACHER, PHASE_NORM, PHASE_STATS, PHASE_FINAL = 1, 2, 4, 8
(S_SUMSQ, S_MAX, S_SUMEXP, S_SUMEXP_U, S_SUMEXP_Y, S_ZSUM, S_ZY, S_ZU, S_ZYH, S_TMAX, S_TSUMEXP, S_R,
 S_S) = range(13)
NUM_STATES = 13
C_INV_NT, C_LSE, C_MASS, C_TLSE, C_S_N2 = range(5)
NUM_CONSTS = 5
SCALE_NONE, SCALE_SEGMENT, SCALE_CLASS = 0, 1, 2
NORM_EPS = 1e-12
MIN_CHUNK = 256
ROW_ALIGN_BYTES = 64
HALF_ADD_BLOCKS = 4  # row blocks whose half-precision dW may be summed in place (one rounding each)


def padded_row_stride(cols: int, itemsize: int) -> int:
    """Row stride (in elements) for rows of ``cols`` values: an odd number of 64-byte lines. Whole lines, because
    BLAS runs measurably slower on unaligned leading dimensions; an odd count, because a stride of a power of two
    bytes (a 16384-class chunk in fp32 is 64 KiB a row) maps the rows onto the same cache sets: at B=1024, V=100K
    the three GEMMs over such chunks took 1.37x the floor, over 16400-wide rows 1.02x."""
    per_line = max(1, ROW_ALIGN_BYTES // itemsize)
    lines = -(-cols // per_line)
    return (lines + 1 - lines % 2) * per_line


def check_layout(lib, name: str) -> None:
    """The compiled kernels of ``lib`` index states, consts, phases and scale kinds by their own enums (exported
    from csrc/common/soft_target_layout.h): they must be the constants above, or the extension is stale."""
    pairs = [(lib.STATES, "S_"), (lib.CONSTS, "C_"), (lib.PHASES, "PHASE_"), (lib.SCALE_KINDS, "SCALE_")]
    wrong = [f"{prefix}{key}" for table, prefix in pairs for key, value in table.items()
             if globals().get(prefix + key) != value]
    if wrong or lib.NUM_STATES != NUM_STATES or lib.NUM_CONSTS != NUM_CONSTS:
        raise ImportError(f"{name} was built for another epilogue layout than kc_kernels.layout "
                          f"(differing: {wrong or 'NUM_STATES/NUM_CONSTS'}); rebuild the extension")


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
