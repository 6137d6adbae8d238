"""The chunked driver of the (linear +) soft-target loss, shared by every fast backend (docs/epilogue.md).

Per chunk of classes: the logits GEMM S = x W_c^T (torch: MKL/oneDNN on CPU, cuBLAS on GPU), the backend's epilogue
(loss statistics, then S overwritten in place by coef_b * dL/du), then the gradient GEMMs dx += S W_c and
dW_c = S^T x, each chunk's dW rows written once. The gradients are produced in the forward pass (3 GEMMs), so the
backward only scales them; nothing is accumulated with atomics, and the same inputs give the same bits.

Chunks hold whole segments whenever a segment fits, so statistics over a segment (softmax log-sum-exp, the
self-paced L2 norm and its gradient term) are complete inside one epilogue call. A segment longer than a chunk is
walked in blocks of rows that each hold the whole segment (one GEMM per block, dW_seg accumulated over the blocks);
for given logits (soft_target_loss) it is walked once per phase instead.

One torch.library op (``kc_kernels::chunked_soft_target``, with a fake implementation and its autograd) serves
every backend; a backend supplies an ``Epilogue`` (kc_kernels/cpu/epilogue.py, kc_kernels/gpu_epilogue.py), named
in its row of the backend table (kc_kernels/dispatch.py). With reduction="none" the per-row weights of the
gradient are only known in backward, so the forward computes the loss alone and the backward op walks again.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

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
        raise ImportError(f"{name} was built for another epilogue layout than kc_kernels.chunked "
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


# ---------------------------------------------------------------------------------------------- host scratch
# A fresh scratch buffer per call is a fresh mapping on the host: glibc serves requests above 32 MiB with mmap and
# unmaps them on free, so every call page-faulted its whole buffer again (a 64 MiB softmax row block: about 9 ms a
# call on the 2-core Xeon; the sampled softmax's 33 MB buffer: 5 of its 118 ms). One buffer per dtype, up to
# WORKSPACE_MAX_BYTES, is kept between calls on the host: a call takes it (two calls at once never share one; the
# second allocates) and gives it back when done. GPU memory is cached by torch's allocator already.
WORKSPACE_MAX_BYTES = 64 << 20
_workspace: Dict[torch.dtype, torch.Tensor] = {}


def take_workspace(numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A 1-D buffer of at least ``numel`` elements (contents undefined): the kept host buffer when it is large
    enough, else a new one."""
    device = torch.device(device)
    if device.type == "cpu":
        held = _workspace.pop(dtype, None)
        if held is not None and held.numel() >= numel:
            return held
    return torch.empty(numel, dtype=dtype, device=device)


def give_back_workspace(buf: torch.Tensor) -> None:
    """Keep ``buf`` (a buffer from take_workspace, or a view of one, whose contents nobody reads any more) for the
    next call."""
    if buf._base is not None:  # a view: keep the whole buffer it was cut from
        buf = buf._base
    if buf.device.type != "cpu" or buf.numel() * buf.element_size() > WORKSPACE_MAX_BYTES or not buf.is_contiguous():
        return
    buf = buf.view(-1)
    held = _workspace.get(buf.dtype)
    if held is None or held.numel() < buf.numel():
        _workspace[buf.dtype] = buf


# The same holds for the op's large gradient outputs (dW [V, H], or dlogits [B, V] of soft_target_loss): a training
# loop drops them every step (optimizer.zero_grad() sets them to None) and the next call asked glibc for 200 MB
# again, whose first touch by the gradient GEMMs page-faulted it in: 50-60 ms of a 1.1 s step at V=100K, H=512.
# So the storage of the last such output of each shape and dtype is kept (as a tensor of its own over the same
# memory) and handed out again once nothing else refers to it: the storage's reference count is then the kept
# tensor's and the query's. A gradient still held (accumulation, a reference kept by the user, two calls before
# one backward) makes a new buffer. While the gradient lives, the kept tensor costs nothing (the memory is the
# gradient's); after it, its size, like a caching allocator. KEPT_OUTPUTS most recent shapes are kept.
KEPT_OUTPUT_MIN_BYTES = 16 << 20
KEPT_OUTPUTS = 4
_kept_outputs: "OrderedDict[Tuple, torch.Tensor]" = OrderedDict()
_kept_lock = threading.Lock()
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # a storage's reference count (absent: nothing kept)


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor of its own (not a view: no _base) over t's memory."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def output_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor for a gradient output the op writes in full (see above for the host's kept ones)."""
    device = torch.device(device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < KEPT_OUTPUT_MIN_BYTES or KEPT_OUTPUTS <= 0 or _use_count is None:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (tuple(shape), dtype)
    with _kept_lock:  # the check and the handing out in one step: two threads never get the same memory
        kept = _kept_outputs.get(key)
        held = None if kept is None else kept.untyped_storage()
        # referenced by the kept tensor and by ``held`` only, and still its size (nobody resized it)
        if held is not None and _use_count(held._cdata) == 2 and held.nbytes() >= nbytes:
            _kept_outputs.move_to_end(key)
            return _alias(kept)
        out = torch.empty(shape, dtype=dtype)
        _kept_outputs[key] = _alias(out)
        _kept_outputs.move_to_end(key)
        while len(_kept_outputs) > KEPT_OUTPUTS:
            _kept_outputs.popitem(last=False)
        return out


def release_host_buffers() -> None:
    """Drop the host memory kept between calls: the scratch buffers and the kept gradient outputs (the memory of a
    gradient that is still alive stays with it)."""
    with _kept_lock:
        _workspace.clear()
        _kept_outputs.clear()


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
    stats: bool  # segment statistics (softmax, or a scale)
    final: int  # PHASE_FINAL, or 0 (a softmax loss without gradients needs no FINAL: the statistics hold it)
    teacher: bool  # a dense softmax teacher's log-sum-exp
    fused: bool  # the teacher phase runs in the calls of the other phases where they hold whole segments
    whole: int  # the bitmask of a call that holds whole segments


class Sweep:
    """One walk over the classes of a validated problem: the loss statistics and, when ``coef`` is given, the
    gradients. ``epilogue`` is the backend's (see kc_kernels/cpu/epilogue.py for the interface)."""

    def __init__(self, p, epilogue, memory_budget: int):
        memory_budget = memory_budget or epilogue.default_memory_budget  # 0: the epilogue's default
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
        per_col = epilogue.bytes_per_class(self)
        # column chunks of at most the epilogue's chunk_bytes (the CPU's: small enough that the chunk the logits GEMM
        # writes is still in cache when the epilogue and the gradient GEMMs read it); a segment longer than a chunk
        # is walked in row blocks that may use the whole budget (fewer passes over its weight rows)
        chunk_budget = min(memory_budget, epilogue.chunk_bytes or memory_budget)
        self.capacity = int(min(p.num_classes, max(MIN_CHUNK, chunk_budget // max(per_col, 1))))
        full_capacity = int(min(p.num_classes, max(MIN_CHUNK, memory_budget // max(per_col, 1))))
        self.block_elems = p.batch * self.row_stride(full_capacity)
        self.plan = plan(tuple(p.bounds), self.capacity, p.grouped)
        self.softmax = p.mode == "softmax"
        self.scale_kind = SCALE_NONE
        self.scale32 = None
        if p.scale is not None:
            self.scale_kind = SCALE_SEGMENT if (p.scale.numel() == self.G and not p.scale_per_class) else SCALE_CLASS
            self.scale32 = p.scale.detach().float().contiguous()
        self.bias32 = None if p.bias is None else p.bias.detach().float().contiguous()
        self.buf = take_workspace(p.batch * self.row_stride(self.capacity), self.work_dtype, self.device)
        self._w_cached = (None, None)
        self.walk = epilogue.begin(self)

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
        if self._w_cached[0] != (c.lo, c.hi):
            self._w_cached = ((c.lo, c.hi), w.to(self.work_dtype))
        return self._w_cached[1]

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
        # blocks (each addmm_ rounds the running sum once, fp32 inside the GEMM: a few roundings, against a fresh
        # [n, H] half GEMM output converted and added per block, which ran the bf16 CPU op at 1.87x its floor
        # instead of 1.31x); else in an fp32 accumulator
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
            if coef is not None:
                self.accumulate_grads(c, u, r0, r1, dw=dw, add=r0 > 0)
        if dw is not None and dw.data_ptr() != self.dw[lo:hi].data_ptr():
            self.dw[lo:hi].copy_(dw)

    def run(self, coef: Optional[torch.Tensor], needs: Sequence[str] = ("x", "weight", "bias", "logits", "scale")
            ) -> Tuple[torch.Tensor, Optional[Dict[str, Optional[torch.Tensor]]]]:
        """Per-row loss [B] (state dtype); with ``coef`` [B] also the gradients (of the inputs named in ``needs``)
        scaled row-wise by it. Gradient GEMMs of inputs that need no gradient are skipped."""
        grads = coef is not None
        coef = self._allocate(coef, needs)
        self._walk(self._phases(grads), coef, grads)
        return self._assemble(coef, grads)

    def _allocate(self, coef: Optional[torch.Tensor], needs: Sequence[str]) -> Optional[torch.Tensor]:
        """The statistics, and with ``coef`` the gradient buffers of the inputs named in ``needs``; ``coef`` as
        the epilogue reads it."""
        p = self.p
        B, dev = p.batch, self.device
        self.state = torch.zeros(NUM_STATES, B, self.G, dtype=self.state_dtype, device=dev)
        self.state[S_MAX] = -math.inf
        self.state[S_TMAX] = -math.inf
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
                       if self.scale_kind == SCALE_CLASS and "scale" in needs else None)
        if not B and self.dw is not None:
            self.dw.zero_()  # an empty batch walks nothing: dW is an uninitialised output otherwise
        return coef

    def _phases(self, grads: bool) -> Phases:
        norm = self.scale_kind != SCALE_NONE
        stats = self.softmax or norm
        final = PHASE_FINAL if (grads or not self.softmax) else 0
        teacher = self.softmax and self.p.teacher_logits is not None
        # an epilogue that fuses the teacher phase runs it in the same call as the other phases wherever a call
        # holds whole segments (a whole chunk, or a long segment's row block): the teacher is read once, while its
        # rows are in cache, instead of in a walk of its own
        fused = teacher and self.ep.fuses_teacher
        whole = (PHASE_NORM if norm else 0) | (PHASE_STATS if stats else 0) | final | (PHASE_TEACHER if fused else 0)
        return Phases(norm, stats, final, teacher, fused, whole)

    def _walk(self, ph: Phases, coef: Optional[torch.Tensor], grads: bool) -> None:
        """Every step of the plan (none for an empty batch): the teacher walk where it is not fused, then each chunk
        of whole segments in one call, each long segment in row blocks (or, for given logits, once per phase)."""
        steps = self.plan.steps if self.p.batch else []
        if ph.teacher:
            for step in steps:
                if ph.fused and (step[0].whole or (self.linear and (ph.norm or ph.stats))):
                    continue
                for c in step:
                    self.walk.run(self, c, None, PHASE_TEACHER, None, None)
            if not ph.fused:
                self.walk.after_teacher(self)
        for step in steps:
            if step[0].whole:
                c = step[0]
                u = self.logits(c)
                self.walk.run(self, c, u, ph.whole, coef, None)
                if grads:
                    self.accumulate_grads(c, u)
                continue
            if self.linear and (ph.norm or ph.stats):
                self._row_blocks(step, ph.whole, coef if grads else None)
                continue
            # a segment longer than a chunk: one walk per phase, recomputing (or re-reading) its logits
            for phase, needed in ((PHASE_NORM, ph.norm), (PHASE_STATS, ph.stats), (ph.final, ph.final != 0)):
                if not needed:
                    continue
                for c in step:
                    u = self.logits(c)
                    self.walk.run(self, c, u, phase, coef if phase == PHASE_FINAL else None, None)
                    if phase == PHASE_FINAL and grads:
                        self.accumulate_grads(c, u)
        give_back_workspace(self.buf)  # no output views it
        if ph.fused:
            self.walk.after_teacher(self)

    def _assemble(self, coef: Optional[torch.Tensor], grads: bool
                  ) -> Tuple[torch.Tensor, Optional[Dict[str, Optional[torch.Tensor]]]]:
        """The per-row loss from the statistics, and the gradients in the inputs' dtypes."""
        p, st = self.p, self.state
        if self.softmax:
            lse = st[S_MAX] + torch.log(st[S_SUMEXP])
            zl = torch.where(st[S_ZSUM] != 0, st[S_ZSUM] * lse, torch.zeros_like(lse))
            loss = p.temperature ** 2 * (zl - st[S_ZY]).sum(dim=1)
        else:
            loss = self.softplus - st[S_ZY].sum(dim=1)
        if not grads:
            return loss, None
        out: Dict[str, Optional[torch.Tensor]] = {}
        if self.linear:
            out["x"] = None if self.dx is None else self.dx.view_as(p.x).to(p.x.dtype)
            out["weight"] = None if self.dw is None else self.dw.to(p.weight.dtype)
            out["bias"] = None if self.db32 is None else self.db32.to(p.bias.dtype)
        else:
            out["logits"] = self.dlogits.to(p.logits.dtype)
        if self.scale_kind == SCALE_SEGMENT:
            out["scale"] = (coef.to(st.dtype)[:, None] * st[S_R]).sum(dim=0).to(p.scale.dtype)
        elif self.scale_kind == SCALE_CLASS and self.dscale is not None:
            out["scale"] = self.dscale.to(p.scale.dtype)
        return loss, out


def row_coef(p, device, dtype, grad_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weight of each row's gradient: sample weight x reduction factor (x the incoming gradient for "none")."""
    coef = torch.ones(p.batch, dtype=dtype, device=device)
    if p.sample_weight is not None:
        coef = coef * p.sample_weight.detach().to(dtype)
    if p.reduction == "mean":
        coef = coef / p.batch
    if grad_rows is not None:
        coef = coef * grad_rows.to(dtype)
    return coef


def reduce_rows(loss_rows: torch.Tensor, p) -> torch.Tensor:
    if p.sample_weight is not None:
        loss_rows = loss_rows * p.sample_weight.detach().to(loss_rows.dtype)
    if p.reduction == "none":
        return loss_rows
    s = loss_rows.sum()
    return s / max(p.batch, 1) if p.reduction == "mean" else s  # the mean of no rows is 0, as its gradient


# ---------------------------------------------------------------------------------------------- the custom ops
# The walk is one torch.library op, so torch.compile and torch.export see a single opaque node with a fake
# (shape-only) implementation instead of tracing into the driver. Problems are not op arguments: the op takes the
# tensors and primitives a problem is made of, and the backend's name (its epilogue is looked up in the table).

GRAD_INPUTS = 4  # gradient slots of the op: (x or logits, weight, bias, scale)


def _epilogue(name: str) -> object:
    from kc_kernels import dispatch

    return dispatch.epilogue("soft_target_loss", name)


def _problem(inp, weight, bias, scale, target_index, target_value, teacher_logits, sample_weight, bounds, mode,
             reduction, temperature):
    """The problem the op's arguments describe (validated by the op front before the op was called)."""
    from kc_kernels.ops.soft_target import SoftTargetProblem

    linear = weight is not None
    return SoftTargetProblem(batch=inp.shape[0], num_classes=weight.shape[0] if linear else inp.shape[1], mode=mode,
                             reduction=reduction, temperature=temperature, x=inp if linear else None,
                             weight=weight, bias=bias, logits=None if linear else inp, target_index=target_index,
                             target_value=target_value, teacher_logits=teacher_logits, bounds=list(bounds),
                             scale=scale, sample_weight=sample_weight)


def _grad_names(linear: bool, needs: int) -> Tuple[str, ...]:
    """The driver's names of the inputs whose gradient bit is set in ``needs`` (bit i: gradient slot i)."""
    names = ("x", "weight", "bias", "scale") if linear else ("logits", None, None, "scale")
    return tuple(n for i, n in enumerate(names) if n is not None and needs >> i & 1)


def _grad_slots(inp, weight, bias, scale, needs: int, grads: Optional[Dict[str, torch.Tensor]]):
    """The op's four gradient outputs: the gradient where its bit is set (an empty tensor of that shape for the
    fake implementation, grads None), else an empty placeholder (ops cannot return None)."""
    slots = []
    names = ("x" if weight is not None else "logits", "weight", "bias", "scale")
    for i, (name, t) in enumerate(zip(names, (inp, weight, bias, scale))):
        if t is None or not needs >> i & 1:
            slots.append(inp.new_empty(0))
        elif grads is None:
            slots.append(torch.empty(t.shape, dtype=t.dtype, device=t.device))
        else:
            slots.append(grads[name])
    return tuple(slots)


def _out_dtype(inp: torch.Tensor) -> torch.dtype:
    return torch.float64 if inp.dtype == torch.float64 else torch.float32


@torch.library.custom_op("kc_kernels::chunked_soft_target", mutates_args=())
def chunked_soft_target(inp: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        scale: Optional[torch.Tensor], target_index: Optional[torch.Tensor],
                        target_value: Optional[torch.Tensor], teacher_logits: Optional[torch.Tensor],
                        sample_weight: Optional[torch.Tensor], bounds: List[int], mode: str, reduction: str,
                        temperature: float, backend: str, memory_budget: int,
                        needs: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of x [B, H] (or grouped) and weight [V, H], or of logits [B, V] when weight is None; with
    reduction "mean"/"sum" also the gradients of the inputs whose bit is set in ``needs`` (the backward only
    scales them). Outputs: (loss, four gradient slots: see _grad_slots)."""
    p = _problem(inp, weight, bias, scale, target_index, target_value, teacher_logits, sample_weight, bounds, mode,
                 reduction, temperature)
    sweep = Sweep(p, _epilogue(backend), memory_budget)
    grads = None
    if needs and reduction != "none":
        loss_rows, grads = sweep.run(row_coef(p, sweep.device, sweep.state_dtype), _grad_names(p.x is not None, needs))
    else:
        loss_rows, _ = sweep.run(None)
        needs = 0
    loss = reduce_rows(loss_rows, p).to(_out_dtype(inp))
    return (loss,) + _grad_slots(inp, weight, bias, scale, needs, grads)


@chunked_soft_target.register_fake
def _chunked_soft_target_fake(inp, weight, bias, scale, target_index, target_value, teacher_logits, sample_weight,
                              bounds, mode, reduction, temperature, backend, memory_budget, needs):
    loss = inp.new_empty((inp.shape[0],) if reduction == "none" else (), dtype=_out_dtype(inp))
    return (loss,) + _grad_slots(inp, weight, bias, scale, needs if reduction != "none" else 0, None)


@torch.library.custom_op("kc_kernels::chunked_soft_target_backward", mutates_args=())
def chunked_soft_target_backward(grad_loss: torch.Tensor, inp: torch.Tensor, weight: Optional[torch.Tensor],
                                 bias: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                                 target_index: Optional[torch.Tensor], target_value: Optional[torch.Tensor],
                                 teacher_logits: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor],
                                 bounds: List[int], mode: str, reduction: str, temperature: float, backend: str,
                                 memory_budget: int,
                                 needs: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A second walk that makes the gradients, rows weighted by ``grad_loss``: reduction "none" (whose row
    weights are known only now), or a backward whose saved gradients were already used."""
    p = _problem(inp, weight, bias, scale, target_index, target_value, teacher_logits, sample_weight, bounds, mode,
                 reduction, temperature)
    sweep = Sweep(p, _epilogue(backend), memory_budget)
    rows = grad_loss if reduction == "none" else None
    coef = row_coef(p, sweep.device, sweep.state_dtype, rows)
    if rows is None:
        coef = coef * grad_loss.to(coef.dtype)
    _, grads = sweep.run(coef, _grad_names(p.x is not None, needs))
    return _grad_slots(inp, weight, bias, scale, needs, grads)


@chunked_soft_target_backward.register_fake
def _chunked_soft_target_backward_fake(grad_loss, inp, weight, bias, scale, *rest):
    return _grad_slots(inp, weight, bias, scale, rest[-1], None)


_TENSOR_ARGS = 8  # inp .. sample_weight; then bounds, mode, reduction, temperature, backend, memory_budget, needs


def _eager(t: torch.Tensor) -> bool:
    """A real tensor outside any tracing: only then may the host read it or the saved gradients be scaled in
    place."""
    return not torch.compiler.is_compiling() and type(t) is torch.Tensor and not torch._is_functional_tensor(t)


def _scaled(grads, grad_loss: torch.Tensor):
    if not _eager(grad_loss):
        return [g * grad_loss.to(g.dtype) for g in grads]
    # in place: a scaled copy would hold a second V x H weight gradient at the peak. On the CPU the usual
    # grad_loss of exactly 1 is skipped; on a GPU reading it would synchronise, so it is applied
    if grad_loss.device.type != "cpu" or float(grad_loss) != 1.0:
        for g in grads:
            g.mul_(grad_loss.to(g.dtype))
    return grads


def register_forward_made_grads(op, backward_op, tensor_args: int, grad_inputs: int) -> None:
    """Autograd of a custom op whose outputs are (loss, one gradient per slot) and whose arguments are
    ``tensor_args`` tensors, then options ending with ``reduction``, backend, ..., ``needs`` (the gradient bitmask,
    last). For reduction "mean"/"sum" the forward made the gradients: backward only scales them by the scalar
    grad_output (once: a second backward, and reduction "none", call ``backward_op`` to make them again)."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:tensor_args])
        ctx.options = inputs[tensor_args:]
        # the gradients made in the forward: not differentiable themselves, so holding them on ctx makes no cycle
        ctx.mark_non_differentiable(*output[1:])
        # no zero gradients made up for those outputs in backward: that was a [V, H] fill (and its page faults)
        # per step
        ctx.set_materialize_grads(False)
        ctx.grads = list(output[1:]) if inputs[-1] and inputs[tensor_args + 2] != "none" else None

    def backward(ctx, grad_loss, *unused):
        needs = ctx.options[-1]
        grads, ctx.grads = ctx.grads, None  # used once: a second backward (retain_graph) makes them again
        if grads is not None:
            grads = _scaled(grads, grad_loss)
        else:
            grads = backward_op(grad_loss, *ctx.saved_tensors, *ctx.options)
        result = [g if needs >> i & 1 else None for i, g in enumerate(grads)]
        return tuple(result) + (None,) * (tensor_args + len(ctx.options) - grad_inputs)

    op.register_autograd(backward, setup_context=setup_context)


# options after the tensors: bounds, mode, reduction (index 2), temperature, backend, memory_budget, needs
register_forward_made_grads(chunked_soft_target, chunked_soft_target_backward, _TENSOR_ARGS, GRAD_INPUTS)


def needs_mask(*tensors: Optional[torch.Tensor]) -> int:
    """The gradient bitmask of an op call: bit i set when tensors[i] needs a gradient (none without grad mode)."""
    if not torch.is_grad_enabled():
        return 0
    return sum(1 << i for i, t in enumerate(tensors) if t is not None and t.requires_grad)


def _call(p, inp: torch.Tensor, weight, bias, backend: str, memory_budget: int) -> torch.Tensor:
    needs = needs_mask(inp, weight, bias, p.scale)
    out = chunked_soft_target(inp, weight, bias, p.scale, p.target_index, p.target_value, p.teacher_logits,
                              p.sample_weight, list(p.bounds), p.mode, p.reduction, float(p.temperature), backend,
                              int(memory_budget), needs)
    return out[0]


def linear_soft_target_loss(p, backend: str) -> torch.Tensor:
    """The op on a validated problem, walked by ``backend``'s epilogue (its row in kc_kernels/dispatch.py)."""
    return _call(p, p.x, p.weight, p.bias, backend, p.memory_budget or 0)


def soft_target_loss(p, backend: str) -> torch.Tensor:
    return _call(p, p.logits, None, None, backend, p.memory_budget or 0)
