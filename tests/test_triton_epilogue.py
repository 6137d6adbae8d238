"""The Triton epilogue kernels (kc_kernels/triton/epilogue.py) against the formulas of docs/epilogue.md evaluated in
float64 with torch, on small odd-sized chunks: several segment pieces whose bounds fall inside the final kernel's
tiles, a sub-chunk of a long segment, one row, sparse targets with padding and duplicates (or none at all), a dense
teacher, with and without scale and bias, both modes, fp32 / fp16 / bf16 scores."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import pytest
import torch

from kc_kernels.gpu_epilogue import EpilogueArgs
from kc_kernels.layout import NORM_EPS, NUM_CONSTS, NUM_STATES, Const, Phase, State
from kc_kernels.loss_modes import LossMode
from kc_kernels.triton import epilogue

T = 2.0
# S written by the final kernel: fp32 arithmetic, then one rounding to the work dtype
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SUM_RTOL = 1e-4  # fp32 sums of a few hundred terms


@dataclass(frozen=True)
class Layout:
    bounds: Tuple[int, ...]  # global segment bounds
    col0: int  # the chunk holds global classes [col0, col0 + ncols)
    ncols: int

    @property
    def V(self) -> int:
        return self.bounds[-1]

    @property
    def G(self) -> int:
        return len(self.bounds) - 1

    def pieces(self) -> List[Tuple[int, int, int]]:
        """(local lo, local hi, segment) of every segment's part inside the chunk."""
        out = []
        for g in range(self.G):
            lo = max(self.bounds[g], self.col0) - self.col0
            hi = min(self.bounds[g + 1], self.col0 + self.ncols) - self.col0
            if hi > lo:
                out.append((lo, hi, g))
        return out

    def seg_of_class(self) -> torch.Tensor:
        b = torch.tensor(self.bounds)
        return torch.repeat_interleave(torch.arange(self.G, dtype=torch.int32), b[1:] - b[:-1])


# whole segments, one of a single class, bounds inside and across the 256-column tiles; 663 columns
WHOLE = Layout((0, 37, 120, 300, 301, 455, 700, 760), 37, 663)
# a sub-chunk of a segment longer than a chunk
PART = Layout((0, 50, 1000, 1010), 300, 301)


@dataclass(frozen=True)
class Case:
    softmax: bool
    targets: str  # "sparse" or "dense"
    K: int
    scale: bool
    bias: bool
    rows: int  # of the final kernel's test; row_stats runs one program per row, so it gets at most 2
    layout: Layout
    dtype: torch.dtype  # of the scores S
    teacher_dtype: torch.dtype = torch.float32


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# every work dtype in both modes, with and without scale; 40 and 33 rows span two row tiles of the final kernel.
# (The interpreter pays per program and per reduction, so the matrix is a list, not a product.)
CASES = {
    "sigmoid-sparse-scale-bias-fp32": Case(False, "sparse", 9, True, True, 40, WHOLE, F32),
    "sigmoid-dense-bias-bf16": Case(False, "dense", 0, False, True, 3, WHOLE, BF16),
    "sigmoid-no-targets-scale-row1-fp16": Case(False, "sparse", 0, True, False, 1, PART, F16),
    "sigmoid-dense-scale-part-fp32": Case(False, "dense", 0, True, True, 2, PART, F32, BF16),
    "softmax-sparse-scale-fp16": Case(True, "sparse", 32, True, False, 3, WHOLE, F16),  # > 8 targets a piece
    "softmax-dense-scale-bias-bf16": Case(True, "dense", 0, True, True, 40, WHOLE, BF16, F16),
    "softmax-dense-row1-fp32": Case(True, "dense", 0, False, False, 1, WHOLE, F32),
    "softmax-sparse-bias-part-bf16": Case(True, "sparse", 5, False, True, 33, PART, BF16),
    "softmax-dense-scale-part-fp16": Case(True, "dense", 0, True, False, 2, PART, F16, BF16),
}


@dataclass
class Problem:
    case: Case
    S: torch.Tensor  # [rows, ncols] view with a row stride wider than the chunk
    teacher: torch.Tensor  # [rows, V] view, or None
    tidx: torch.Tensor  # sorted int32 [rows, K], padding V; or None
    tval: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    coef: torch.Tensor

    @property
    def rows(self) -> int:
        return self.S.shape[0]

    def args(self, states, scores=True, consts=None, coef=None, row_part=None, col_part=None, want_dbias=False,
             want_dscale=False) -> EpilogueArgs:
        lay = self.case.layout
        pieces = lay.pieces()
        return EpilogueArgs(
            S=self.S if scores else None, col0=lay.col0, rows=self.S.shape[0], ncols=lay.ncols, pieces=len(pieces),
            piece_lo=torch.tensor([p[0] for p in pieces] + [pieces[-1][1]], dtype=torch.int32),
            piece_seg=torch.tensor([p[2] for p in pieces], dtype=torch.int32), num_segments=lay.G,
            seg_of_class=lay.seg_of_class(), bias=self.bias, scale=self.scale, teacher=self.teacher,
            tidx=self.tidx, tval=self.tval, states=states, consts=consts, coef=coef,
            mode=LossMode.SOFTMAX if self.case.softmax else LossMode.SIGMOID,
            inv_t=1.0 / T, t2=T * T, row_part=row_part, col_part=col_part, want_dbias=want_dbias,
            want_dscale=want_dscale)


def sparse_targets(gen, rows: int, K: int, lay: Layout):
    """Sorted targets mostly inside the chunk and around its edges, with duplicates and padding (class V)."""
    idx = torch.randint(max(lay.col0 - 20, 0), min(lay.col0 + lay.ncols + 20, lay.V), (rows, K), generator=gen)
    val = torch.rand(rows, K, generator=gen)
    if K >= 3:
        idx[:, 1] = idx[:, 0]  # duplicates add up
        pad = torch.rand(rows, K, generator=gen) < 0.25
        pad[:, :2] = False
        idx[pad] = lay.V
        val[pad] = 0.0
    idx, order = torch.sort(idx, dim=1)
    return idx.to(torch.int32).contiguous(), val.gather(1, order).contiguous()


def mask_out_teacher_classes(teacher: torch.Tensor, lay: Layout):
    """Classes a teacher rules out (logit -inf): a few here and there, and in row 0 a whole row_stats step at the
    start of the second piece (the step's running max stays -inf), the rest of the piece finite."""
    teacher[:, lay.col0 + 5::97] = float("-inf")
    lo, hi, _ = lay.pieces()[1]
    if hi - lo > epilogue._MAX_ROW_BLOCK:
        teacher[0, lay.col0 + lo:lay.col0 + lo + epilogue._MAX_ROW_BLOCK] = float("-inf")


def make_problem(gen, case: Case, rows: int) -> Problem:
    lay, dtype = case.layout, case.dtype
    S = (3 * torch.randn(rows, lay.ncols + 5, generator=gen)).to(dtype)[:, :lay.ncols]
    teacher = tidx = tval = None
    if case.targets == "dense":
        teacher = (3 * torch.randn(rows, lay.V + 3, generator=gen)).to(case.teacher_dtype)[:, :lay.V]
        if case.softmax and lay is WHOLE:
            mask_out_teacher_classes(teacher, lay)
    else:
        tidx, tval = sparse_targets(gen, rows, case.K, lay)
    scale = 0.5 + 1.5 * torch.rand(lay.V, generator=gen) if case.scale else None
    bias = 0.5 * torch.randn(lay.V, generator=gen) if case.bias else None
    coef = 0.5 + torch.rand(rows, generator=gen)
    return Problem(case, S, teacher, tidx, tval, scale, bias, coef)


def initial_states(gen, rows: int, G: int, fresh: bool) -> torch.Tensor:
    """A [NUM_STATES, rows, G] view with permuted strides; fresh: as the driver starts them (maxima at -inf,
    the rest 0), else what earlier chunks may have left (so every merge meets an existing value)."""
    st = torch.empty(G, NUM_STATES, rows).permute(1, 2, 0)
    if fresh:
        st.zero_()
        st[State.MAX] = st[State.TMAX] = float("-inf")
    else:
        st.copy_(torch.rand(NUM_STATES, rows, G, generator=gen) * 3)
        st[State.MAX] = st[State.TMAX] = torch.randn(rows, G, generator=gen) * 2
    return st


# ------------------------------------------------------------------------------------------- float64 formulas

def dense_z(pr: Problem) -> torch.Tensor:
    """Sparse targets as a [rows, V] float64 matrix (duplicates add up, padding dropped)."""
    V = pr.case.layout.V
    z = torch.zeros(pr.rows, V + 1, dtype=torch.float64)
    z.scatter_add_(1, pr.tidx.long(), pr.tval.double())
    return z[:, :V]


def class_vectors(pr: Problem, cls: torch.Tensor):
    """(s_j, bias_j) float64 of the classes ``cls``, 1 and 0 when absent."""
    s = pr.scale.double()[cls] if pr.scale is not None else torch.ones(len(cls), dtype=torch.float64)
    b = pr.bias.double()[cls] if pr.bias is not None else torch.zeros(len(cls), dtype=torch.float64)
    return s, b


def merge(st, which_max: int, which_sums, m, sums):
    """Online merge of (m, sums) into the states, as the doc states it; -inf on both sides stays -inf, sums 0."""
    old = st[which_max]
    new = torch.maximum(old, m)
    f_old = torch.where(old == new, torch.ones_like(old), torch.exp(old - new))
    f_new = torch.where(m == new, torch.ones_like(m), torch.exp(m - new))
    for w, s in zip(which_sums, sums):
        st[w] = st[w] * f_old + s * f_new
    st[which_max] = new


def reference_row_stats(pr: Problem, states: torch.Tensor, phases: int) -> torch.Tensor:
    c, lay = pr.case, pr.case.layout
    inv_t = 1.0 / T
    st = states.double().clone()
    u = pr.S.double()
    z_all = dense_z(pr) if c.targets == "sparse" else None
    for lo, hi, g in lay.pieces():
        cls = torch.arange(lay.col0 + lo, lay.col0 + hi)
        sg = st[:, :, g]  # a view: updates land in st
        uu = u[:, lo:hi]
        t = pr.teacher.double()[:, cls] * inv_t if c.targets == "dense" else None
        if phases & Phase.TEACHER and c.softmax and t is not None:
            m = t.max(dim=1).values
            e = torch.exp(t - m[:, None])
            merge(sg, State.TMAX, [State.TSUMEXP, State.TENT], m,
                  [e.sum(1), (e * torch.where(e > 0, t, 0.0)).sum(1)])
        if phases & Phase.NORM:
            sg[State.SUMSQ] += (uu * uu).sum(1)
        if not phases & Phase.STATS:
            continue
        inv_nt = inv_t / torch.sqrt(sg[State.SUMSQ] + NORM_EPS) if c.scale else torch.full((pr.rows,), inv_t,
                                                                                        dtype=torch.float64)
        s, b = class_vectors(pr, cls)
        up = uu * inv_nt[:, None]
        yh = up * s
        y = yh + b * inv_t
        if t is None:
            z = z_all[:, cls]
        elif c.softmax:
            z = torch.exp(t - (sg[State.TMAX] + torch.log(sg[State.TSUMEXP]))[:, None])
        else:
            z = torch.sigmoid(t)
        sg[State.ZSUM] += z.sum(1)
        sg[State.ZY] += (z * y).sum(1)
        sg[State.ZU] += (z * up).sum(1)
        sg[State.ZYH] += (z * yh).sum(1)
        if c.softmax:
            m = y.max(dim=1).values
            e = torch.exp(y - m[:, None])
            merge(sg, State.MAX, [State.SUMEXP, State.SUMEXP_U, State.SUMEXP_Y], m,
                  [e.sum(1), (e * up).sum(1), (e * yh).sum(1)])
        else:
            sig = torch.sigmoid(y)
            sg[State.SUMEXP_U] += (sig * up).sum(1)
            sg[State.SUMEXP_Y] += (sig * yh).sum(1)
    return st


def reference_consts(pr: Problem) -> torch.Tensor:
    """The final kernel's constants from this chunk's own statistics (as the driver derives them), fp32."""
    c, lay = pr.case, pr.case.layout
    st = reference_row_stats(pr, initial_states(None, pr.rows, lay.G, fresh=True),
                             Phase.TEACHER | Phase.NORM | Phase.STATS)
    cs = torch.zeros(NUM_CONSTS, pr.rows, lay.G, dtype=torch.float64)
    sq = st[State.SUMSQ] + NORM_EPS
    cs[Const.INV_NT] = torch.rsqrt(sq) / T if c.scale else 1.0 / T
    if c.softmax:
        cs[Const.LSE] = st[State.MAX] + torch.log(st[State.SUMEXP])
        cs[Const.MASS] = st[State.ZSUM]
        if c.targets == "dense":
            cs[Const.TLSE] = st[State.TMAX] + torch.log(st[State.TSUMEXP])
    if c.scale:
        if c.softmax:
            S = T * T * (st[State.ZSUM] * st[State.SUMEXP_Y] / st[State.SUMEXP] - st[State.ZYH])
        else:
            S = st[State.SUMEXP_Y] - st[State.ZYH]
        cs[Const.S_N2] = S / sq
    touched = torch.zeros(lay.G, dtype=torch.bool)
    touched[[g for _, _, g in lay.pieces()]] = True
    return torch.where(touched, cs, torch.zeros(())).float().contiguous()  # untouched segments: never read


def reference_final(pr: Problem, consts: torch.Tensor, coef):
    """(row_part [2, n_col_tiles, rows], gradient [rows, ncols] or None, col_part [2, n_row_tiles, ncols] or None)."""
    c, lay = pr.case, pr.case.layout
    inv_t = 1.0 / T
    br, bc = epilogue.TILE
    cls = torch.arange(lay.col0, lay.col0 + lay.ncols)
    g = lay.seg_of_class()[cls].long()
    k = consts.double()[:, :, g]  # [NUM_CONSTS, rows, ncols]
    u = pr.S.double()
    s, b = class_vectors(pr, cls)
    up = u * k[Const.INV_NT]
    y = up * s + b * inv_t
    if c.targets == "sparse":
        z = dense_z(pr)[:, cls]
    elif c.softmax:
        z = torch.exp(pr.teacher.double()[:, cls] * inv_t - k[Const.TLSE])
    else:
        z = torch.sigmoid(pr.teacher.double()[:, cls] * inv_t)
    if c.softmax:
        q = T * T * (k[Const.MASS] * torch.exp(y - k[Const.LSE]) - z)
        softplus = torch.zeros_like(y)
    else:
        q = torch.sigmoid(y) - z
        softplus = torch.nn.functional.softplus(y)
    n_col_tiles = -(-lay.ncols // bc)
    row_part = torch.stack([torch.stack([v[:, i * bc:(i + 1) * bc].sum(1) for i in range(n_col_tiles)])
                            for v in (softplus, z * y)])
    if coef is None:
        return row_part, None, None
    cf = coef.double()[:, None]
    grad = cf * (s * k[Const.INV_NT] * q - u * k[Const.S_N2]) if c.scale else cf * q * inv_t
    n_row_tiles = -(-pr.rows // br)
    col_part = torch.stack([torch.stack([v[i * br:(i + 1) * br].sum(0) for i in range(n_row_tiles)])
                            for v in (cf * q * inv_t, cf * q * up)])
    return row_part, grad, col_part


def assert_close_scaled(actual, expected, rtol):
    """Elementwise within rtol of the largest magnitude: sums and differences may cancel to near zero."""
    expected = expected.double()
    tol = rtol * max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=tol)


# ------------------------------------------------------------------------------------------- tests

ALL_STATS = Phase.TEACHER | Phase.NORM | Phase.STATS


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_row_stats(gen, case):
    """As the driver calls it: TEACHER alone first (no scores yet) over every chunk; then a chunk of whole segments
    runs NORM and STATS in one call (the norm complete before the statistics read it), a sub-chunk of a longer
    segment one phase per call, merging into what the segment's earlier sub-chunks left."""
    pr = make_problem(gen, case, min(case.rows, 2))
    whole = case.layout is WHOLE
    states = initial_states(gen, pr.rows, case.layout.G, fresh=whole)
    expected = states.double().clone()
    calls = [Phase.TEACHER, Phase.NORM | Phase.STATS] if whole else [Phase.TEACHER, Phase.NORM, Phase.STATS]
    for phases in calls:
        epilogue.row_stats(pr.args(states, scores=phases != Phase.TEACHER), phases)
        expected = reference_row_stats(pr, expected.float(), phases)
        torch.testing.assert_close(states.double(), expected, rtol=2e-5, atol=2e-5)


def test_row_stats_all_phases_in_one_call(gen):
    """TEACHER | NORM | STATS together: the teacher's log-sum-exp and the norm are complete before STATS."""
    case = CASES["softmax-dense-scale-bias-bf16"]
    pr = make_problem(gen, case, 2)
    states = initial_states(gen, pr.rows, case.layout.G, fresh=True)
    epilogue.row_stats(pr.args(states), ALL_STATS)
    expected = reference_row_stats(pr, initial_states(gen, pr.rows, case.layout.G, fresh=True), ALL_STATS)
    torch.testing.assert_close(states.double(), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_final(gen, case):
    pr = make_problem(gen, case, case.rows)
    lay, rows, dtype = case.layout, case.rows, case.dtype
    br, bc = epilogue.TILE
    n_row_tiles, n_col_tiles = -(-rows // br), -(-lay.ncols // bc)
    consts = reference_consts(pr)
    states = initial_states(gen, rows, lay.G, fresh=True)
    u = pr.S.clone()
    exp_row_part, grad, exp_col_part = reference_final(pr, consts, pr.coef)

    # loss sums only: S is left as it is
    row_part = torch.full((2, n_col_tiles, rows), float("nan"))
    epilogue.final(pr.args(states, consts=consts, row_part=row_part))
    assert_close_scaled(row_part, exp_row_part, SUM_RTOL)
    assert torch.equal(pr.S, u)

    # with the gradient; only the bias plane of the column sums is asked for: the other is not written
    row_part.fill_(float("nan"))
    col_part = torch.full((2, n_row_tiles, lay.ncols), float("nan"))
    epilogue.final(pr.args(states, consts=consts, coef=pr.coef, row_part=row_part, col_part=col_part,
                           want_dbias=True, want_dscale=False))
    assert_close_scaled(row_part, exp_row_part, SUM_RTOL)
    assert_close_scaled(pr.S, grad.to(dtype), GRAD_RTOL[dtype])
    assert_close_scaled(col_part[0], exp_col_part[0], SUM_RTOL)
    assert torch.isnan(col_part[1]).all()

    if case.scale:  # the per-class scale gradient plane
        pr.S.copy_(u)
        col_part.fill_(float("nan"))
        epilogue.final(pr.args(states, consts=consts, coef=pr.coef, row_part=row_part, col_part=col_part,
                               want_dbias=False, want_dscale=True))
        assert_close_scaled(pr.S, grad.to(dtype), GRAD_RTOL[dtype])
        assert_close_scaled(col_part[1], exp_col_part[1], SUM_RTOL)
        assert torch.isnan(col_part[0]).all()


def test_tile_is_powers_of_two():
    """The driver sizes row_part and col_part from TILE; the kernel's aranges need powers of two."""
    br, bc = epilogue.TILE
    assert br & (br - 1) == 0 and bc & (bc - 1) == 0
