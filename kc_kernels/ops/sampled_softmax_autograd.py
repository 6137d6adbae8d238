"""The custom op (dense gradients) and the autograd.Function (sparse gradients) shared by the sampled-softmax
backends, and the row bookkeeping around them.

A backend supplies two steps (see ``SampledSoftmaxImpl``): ``forward`` gives the per-row loss and whatever it keeps
for the gradients; ``gradients`` turns per-row scales into dx and the gradient of every touched weight row. This
module applies sample_weight and the reduction, and assembles weight and bias gradients as dense tensors or as
sparse COO rows.

For reduction "mean"/"sum" the gradients are computed in the forward call (the logits are still hot there) and the
backward only scales them by the scalar grad_output. For reduction "none" grad_output is a vector whose entries
mix rows in the weight gradient, so the gradients wait for the backward call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Protocol, Tuple

import torch

from kc_kernels.custom_op import needs_mask, register_forward_made_grads
from kc_kernels.host_buffers import output_buffer
from kc_kernels.reduction import compute_dtype, row_weights


def labels_2d(p) -> Tuple[torch.Tensor, torch.Tensor]:
    """labels [B, T] (int64, -1 padding) and true expected counts [B, T]. A label outside [0, V) becomes padding:
    the op front refuses one where value checks run, a direct call of the op (a compiled graph) is masked, never
    read out of bounds (kc_kernels.reference.sampled_logits)."""
    labels, true_expected = p.labels, p.sampled[1]
    if labels.dim() == 1:
        labels, true_expected = labels[:, None], true_expected.reshape(-1, 1)
    labels = labels.long()
    in_range = (labels >= 0) & (labels < p.weight.shape[0])
    return torch.where(in_range, labels, torch.full_like(labels, -1)), true_expected


def sampled_ids(p) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sampled ids as int64 with any id outside [0, V) replaced by 0, the [S] mask of the ids in range): a
    backend gathers with the first and gives the columns outside the mask a logit of -inf (no gradient)."""
    ids = p.sampled[0].long()
    in_range = (ids >= 0) & (ids < p.weight.shape[0])
    return torch.where(in_range, ids, torch.zeros_like(ids)), in_range


ACCIDENTAL_HITS = ("all", "tensorflow")


def last_copies(ids: torch.Tensor) -> torch.Tensor:
    """[S] bool: True at the last position of each distinct id (every position when ids do not repeat).
    TensorFlow's accidental-hit lookup keeps one position per id, the last one drawn; ``accidental_hits=
    "tensorflow"`` masks only those."""
    sorted_ids, order = torch.sort(ids, stable=True)  # stable: within a run of one id, the last is drawn last
    last = torch.ones_like(sorted_ids, dtype=torch.bool)
    last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
    return torch.zeros_like(last).index_put_((order,), last)


def hit_mode(p) -> str:
    """What the problem masks: "none", "all" (every copy of a row's label among the samples) or "tensorflow"."""
    return p.accidental_hits if p.remove_accidental_hits else "none"


def accidental_hits(labels: torch.Tensor, ids: torch.Tensor,
                    mode: str = "all") -> Tuple[torch.Tensor, torch.Tensor]:
    """(row, sampled position) of every sampled id equal to one of the row's labels, by binary search; with mode
    "tensorflow" only the id's last position (``last_copies``).

    O(B*T*log S) instead of a [B, T, S] comparison; ids may repeat (sampling without ``unique``), and padding (-1)
    never matches since ids are >= 0. A pair may appear twice when a row repeats a label.
    """
    B, T = labels.shape
    sorted_ids, order = torch.sort(ids)
    flat = labels.reshape(-1).contiguous()  # searchsorted warns on (and copies) strided input
    lo = torch.searchsorted(sorted_ids, flat)
    count = torch.searchsorted(sorted_ids, flat, right=True) - lo
    total = int(count.sum())
    if total == 0:
        empty = torch.empty(0, dtype=torch.long, device=labels.device)
        return empty, empty
    rows = torch.arange(B, device=labels.device).repeat_interleave(T).repeat_interleave(count)
    start = (lo - torch.cumsum(count, 0) + count).repeat_interleave(count)  # lo minus the pairs before it
    cols = order[start + torch.arange(total, device=labels.device)]
    if mode == "tensorflow":
        keep = last_copies(ids)[cols]
        rows, cols = rows[keep], cols[keep]
    return rows, cols


def row_scale(p, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """d(reduced loss) / d(per-row loss): sample_weight, divided by B for "mean"."""
    return row_weights(p.sample_weight, batch, p.reduction, dtype, p.x.device)


class SampledSoftmaxImpl(Protocol):
    def forward(self, p, need_grad: bool) -> Tuple[torch.Tensor, Any]:
        """Per-row loss [B] in the compute dtype, and the state ``gradients`` needs (None when not need_grad)."""

    def gradients(self, state, scale: torch.Tensor, need_x: bool) -> "RowGradients":
        """Gradients of sum_b scale[b] * loss[b] (dx None unless need_x)."""


@dataclass
class RowGradients:
    """Gradient pieces; weight rows come in parts (e.g. sampled rows, true rows) so nothing is concatenated."""
    dx: Optional[torch.Tensor]  # [B, H], compute dtype
    rows: List[torch.Tensor]  # parts of [R_i] class ids of the touched rows, repeats allowed
    dweight: List[torch.Tensor]  # parts of [R_i, H] compute dtype; rows that repeat add up
    dbias: List[torch.Tensor]  # parts of [R_i]
    distinct: bool = False  # the rows of all parts are already distinct: no summing needed


class _EmptyBatch:
    """The impl of every backend for B = 0: loss 0 (no rows) and zero gradients, without calling a kernel."""

    def forward(self, p, need_grad: bool) -> Tuple[torch.Tensor, Any]:
        return p.x.new_zeros(0, dtype=compute_dtype(p.x.dtype)), p

    def gradients(self, p, scale: torch.Tensor, need_x: bool) -> "RowGradients":
        dt, H = compute_dtype(p.x.dtype), p.x.shape[1]
        none = torch.zeros(0, dtype=torch.long, device=p.x.device)
        return RowGradients(p.x.new_zeros(0, H, dtype=dt) if need_x else None, [none],
                            [p.x.new_zeros(0, H, dtype=dt)], [p.x.new_zeros(0, dtype=dt)], distinct=True)


EMPTY_BATCH = _EmptyBatch()


def _for_batch(impl: SampledSoftmaxImpl, x: torch.Tensor) -> SampledSoftmaxImpl:
    return EMPTY_BATCH if x.shape[0] == 0 else impl


@dataclass
class _Grads:
    dx: Optional[torch.Tensor]
    rows: torch.Tensor  # [U] distinct touched classes (sorted unless from a ``distinct`` RowGradients)
    dweight: Optional[torch.Tensor]  # [U, H] compute dtype
    dbias: Optional[torch.Tensor]  # [U]


def _cat(parts: List[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _coalesce(g: RowGradients, need_w: bool, need_b: bool) -> _Grads:
    if g.distinct:
        return _Grads(g.dx, _cat(g.rows), _cat(g.dweight) if need_w else None, _cat(g.dbias) if need_b else None)
    uniq, inverse = torch.unique(torch.cat(g.rows), return_inverse=True)
    parts = torch.split(inverse, [len(r) for r in g.rows])
    dw = db = None
    if need_w:
        ref = g.dweight[0]
        dw = torch.zeros(len(uniq), ref.shape[1], dtype=ref.dtype, device=ref.device)
        for idx, values in zip(parts, g.dweight):
            dw.index_add_(0, idx, values)
    if need_b:
        db = torch.zeros(len(uniq), dtype=g.dbias[0].dtype, device=uniq.device)
        for idx, values in zip(parts, g.dbias):
            db.index_add_(0, idx, values)
    return _Grads(g.dx, uniq, dw, db)


def _expand(values: torch.Tensor, rows: torch.Tensor, like: torch.Tensor, sparse: bool) -> torch.Tensor:
    """Touched-row gradient values (distinct rows) as a full gradient of ``like``: dense, or a coalesced sparse
    COO tensor."""
    values = values.to(like.dtype)
    if sparse:
        if len(rows) > 1 and bool((rows[1:] < rows[:-1]).any()):  # coalesced COO wants sorted indices
            rows, order = torch.sort(rows)
            values = values[order]
        return torch.sparse_coo_tensor(rows[None], values, like.shape, is_coalesced=True, check_invariants=False)
    out = output_buffer(like.shape, like.dtype, like.device).zero_()  # a kept host buffer (host_buffers.py)
    out.index_copy_(0, rows, values)
    return out


class SampledSoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, p, impl: SampledSoftmaxImpl):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_grad = need_x or need_w or (bias is not None and need_b)
        impl = _for_batch(impl, x)
        per_row, state = impl.forward(p, need_grad)
        B = x.shape[0]
        scale = row_scale(p, B, per_row.dtype)
        ctx.p, ctx.impl, ctx.needs = p, impl, (need_x, need_w, bias is not None and need_b)
        ctx.grads = ctx.state = None
        if need_grad:
            if p.reduction == "none":
                ctx.state, ctx.scale = state, scale
            else:
                ctx.grads = _coalesce(impl.gradients(state, scale, need_x), need_w, ctx.needs[2])
        if p.reduction == "none":
            return per_row * scale
        return (per_row * scale).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        p, (need_x, need_w, need_b) = ctx.p, ctx.needs
        if ctx.grads is not None:
            g = ctx.grads
            ctx.grads = None
            go = float(grad_out)
            if go != 1.0:  # the usual loss.backward() passes exactly 1
                g = _Grads(None if g.dx is None else g.dx * go, g.rows, None if g.dweight is None else g.dweight * go,
                           None if g.dbias is None else g.dbias * go)
        else:
            scale = ctx.scale * grad_out.to(ctx.scale.dtype)
            g = _coalesce(ctx.impl.gradients(ctx.state, scale, need_x), need_w, need_b)
            ctx.state = None
        dx = g.dx.to(p.x.dtype) if need_x else None
        dw = _expand(g.dweight, g.rows, p.weight, p.sparse_grad) if need_w else None
        db = _expand(g.dbias, g.rows, p.bias, p.sparse_grad) if need_b else None
        return dx, dw, db, None, None


def apply(p, impl: SampledSoftmaxImpl) -> torch.Tensor:
    return SampledSoftmaxFunction.apply(p.x, p.weight, p.bias, p, impl)


# ---------------------------------------------------------------------------------------------- the custom op
# With dense gradients the computation is one torch.library op, so torch.compile and torch.export see a single
# opaque node with a fake (shape-only) implementation. The op takes the tensors and flags a problem is made of and
# the backend's name (its SampledSoftmaxImpl is its row's epilogue in kc_kernels/dispatch.py). Sparse COO
# gradients do not fit an op's schema, so sparse_grad keeps SampledSoftmaxFunction above.

_TENSOR_ARGS = 8  # x .. sample_weight; then accidental_hits, subtract_log_q, reduction, backend, needs


def _impl(name: str) -> SampledSoftmaxImpl:
    from kc_kernels import dispatch

    return dispatch.epilogue("sampled_softmax_loss", name)


def _problem(x, weight, bias, labels, ids, true_expected, sampled_expected, sample_weight, accidental_hits,
             subtract_log_q, reduction):
    """The problem the op's arguments describe (validated by the op front before the op was called);
    accidental_hits is ``hit_mode``'s value."""
    from kc_kernels.ops.sampled_softmax import SampledSoftmaxProblem

    return SampledSoftmaxProblem(x=x, weight=weight, bias=bias, labels=labels,
                                 sampled=(ids, true_expected, sampled_expected),
                                 remove_accidental_hits=accidental_hits != "none",
                                 accidental_hits="all" if accidental_hits == "none" else accidental_hits,
                                 subtract_log_q=subtract_log_q, reduction=reduction, sample_weight=sample_weight)


def _grad_slots(x, weight, bias, needs: int, g: Optional[_Grads]) -> Tuple[torch.Tensor, ...]:
    """The op's three gradient outputs (dense dx, dweight, dbias): the gradient where its bit is set in ``needs``
    (an empty tensor of that shape for the fake implementation, g None), else an empty placeholder."""
    slots = []
    for i, t in enumerate((x, weight, bias)):
        if t is None or not needs >> i & 1:
            slots.append(x.new_empty(0))
        elif g is None:
            slots.append(torch.empty(t.shape, dtype=t.dtype, device=t.device))
        elif i == 0:
            slots.append(g.dx.to(x.dtype))
        else:
            slots.append(_expand(g.dweight if i == 1 else g.dbias, g.rows, t, False))
    return tuple(slots)


def _dense_slots(x, weight, bias, needs: int, rg: RowGradients) -> Tuple[torch.Tensor, ...]:
    """``_grad_slots`` of uncoalesced row gradients. When the parameters are in the compute dtype, the parts are
    added straight into the dense gradients (no [U, H] coalesced copy in between); half parameters coalesce in
    the compute dtype first, so that repeated rows are not summed in half precision."""
    if weight.dtype != rg.dweight[0].dtype:
        need_w, need_b = bool(needs & 2), bias is not None and bool(needs & 4)
        return _grad_slots(x, weight, bias, needs, _coalesce(rg, need_w, need_b))
    slots = []
    for i, t in enumerate((x, weight, bias)):
        if t is None or not needs >> i & 1:
            slots.append(x.new_empty(0))
        elif i == 0:
            slots.append(rg.dx.to(x.dtype))
        else:
            out = output_buffer(t.shape, t.dtype, t.device).zero_()
            for rows, values in zip(rg.rows, rg.dweight if i == 1 else rg.dbias):
                if rg.distinct:
                    out.index_copy_(0, rows, values.to(t.dtype))
                else:
                    out.index_add_(0, rows, values.to(t.dtype))
            slots.append(out)
    return tuple(slots)


def _needs_bits(needs: int, bias) -> Tuple[bool, bool, bool]:
    return bool(needs & 1), bool(needs & 2), bias is not None and bool(needs & 4)


@torch.library.custom_op("kc_kernels::sampled_softmax", mutates_args=())
def sampled_softmax(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                    ids: torch.Tensor, true_expected: torch.Tensor, sampled_expected: torch.Tensor,
                    sample_weight: Optional[torch.Tensor], accidental_hits: str, subtract_log_q: bool,
                    reduction: str, backend: str,
                    needs: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of x [B, H], weight [V, H] over the true and sampled classes; with reduction "mean"/"sum" also the
    dense gradients of the inputs whose bit is set in ``needs`` (the backward only scales them). accidental_hits is
    "none", "all" or "tensorflow" (``hit_mode``). Outputs: (loss, dx, dweight, dbias), an empty placeholder where
    no gradient was asked for."""
    p = _problem(x, weight, bias, labels, ids, true_expected, sampled_expected, sample_weight,
                 accidental_hits, subtract_log_q, reduction)
    impl = _for_batch(_impl(backend), x)
    need_x, need_w, need_b = _needs_bits(needs, bias)
    need_grad = reduction != "none" and (need_x or need_w or need_b)
    per_row, state = impl.forward(p, need_grad)
    scale = row_scale(p, x.shape[0], per_row.dtype)
    loss = per_row * scale
    if reduction != "none":
        loss = loss.sum()
    if not need_grad:
        return (loss,) + _grad_slots(x, weight, bias, 0, None)
    return (loss,) + _dense_slots(x, weight, bias, needs, impl.gradients(state, scale, need_x))


@sampled_softmax.register_fake
def _sampled_softmax_fake(x, weight, bias, labels, ids, true_expected, sampled_expected, sample_weight,
                          accidental_hits, subtract_log_q, reduction, backend, needs):
    loss = x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=compute_dtype(x.dtype))
    return (loss,) + _grad_slots(x, weight, bias, needs if reduction != "none" else 0, None)


@torch.library.custom_op("kc_kernels::sampled_softmax_backward", mutates_args=())
def sampled_softmax_backward(grad_loss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor], labels: torch.Tensor, ids: torch.Tensor,
                             true_expected: torch.Tensor, sampled_expected: torch.Tensor,
                             sample_weight: Optional[torch.Tensor], accidental_hits: str,
                             subtract_log_q: bool, reduction: str, backend: str,
                             needs: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients again, rows weighted by ``grad_loss``: reduction "none" (whose row weights are known only
    now), or a backward whose saved gradients were already used."""
    p = _problem(x, weight, bias, labels, ids, true_expected, sampled_expected, sample_weight,
                 accidental_hits, subtract_log_q, reduction)
    impl = _for_batch(_impl(backend), x)
    need_x, need_w, need_b = _needs_bits(needs, bias)
    per_row, state = impl.forward(p, True)
    scale = row_scale(p, x.shape[0], per_row.dtype) * grad_loss.to(per_row.dtype)
    return _dense_slots(x, weight, bias, needs, impl.gradients(state, scale, need_x))


@sampled_softmax_backward.register_fake
def _sampled_softmax_backward_fake(grad_loss, x, weight, bias, *rest):
    return _grad_slots(x, weight, bias, rest[-1], None)


def _register_autograd() -> None:
    # options after the tensors: accidental_hits, subtract_log_q, reduction (index 2), backend, needs
    register_forward_made_grads(sampled_softmax, sampled_softmax_backward, _TENSOR_ARGS, 3)


_register_autograd()


def call_op(p, backend: str) -> torch.Tensor:
    """The op on a validated problem with dense gradients, computed by ``backend``'s impl."""
    needs = needs_mask(p.x, p.weight, p.bias)
    ids, true_expected, sampled_expected = p.sampled
    out = sampled_softmax(p.x, p.weight, p.bias, p.labels, ids, true_expected, sampled_expected, p.sample_weight,
                          hit_mode(p), bool(p.subtract_log_q), p.reduction, backend, needs)
    return out[0]


def run(p, backend: str) -> torch.Tensor:
    """The implementation of every sampled-softmax row but the reference: sparse gradients through
    SampledSoftmaxFunction, dense ones through the custom op."""
    if p.sparse_grad:
        return apply(p, _impl(backend))
    return call_op(p, backend)
