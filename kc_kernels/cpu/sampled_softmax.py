"""Sampled softmax on CPU.

The S sampled classes are the columns of one GEMM: their weight rows gathered once, padded with zero rows to an
odd number of 64-byte lines (BLAS is slower on other strides: docs/performance.md), give the [B, S] logits. A
row's true logits are row-wise dot products with its own labels' weight rows
([B, T, H], gathered once): a label that was not sampled costs O(H) for its row, not a [B] column of the GEMM.
One in-place pass over the buffer gives the loss and the softmax probabilities, which are dlogits there (the
sampled targets are 0; masked entries have probability 0), so the sampled part of the gradients is two GEMMs on
the buffer (dx = D @ W_s, dW_s = D^T @ x); the true part is a [B, T] weighting of the gathered label rows and of
x. Half inputs are upcast to fp32 after the gather, so only the gathered rows are converted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kc_kernels import _C
from kc_kernels.custom_op import eager as _eager
from kc_kernels.host_buffers import give_back_workspace, take_workspace
from kc_kernels.layout import padded_row_stride
from kc_kernels.ops import sampled_softmax_autograd as autograd_
from kc_kernels.ops.sampled_softmax_autograd import RowGradients
from kc_kernels.reduction import compute_dtype


@dataclass
class _State:
    x: torch.Tensor  # [B, H] compute dtype
    w_sampled: torch.Tensor  # [S + padding, H] weight rows of the sampled classes, zero rows after S
    ids: torch.Tensor  # [S] sampled classes
    w_true: torch.Tensor  # [B, T, H] weight rows of every row's labels (row 0 where padded)
    labels: torch.Tensor  # [B, T] int64, -1 padding
    valid: torch.Tensor  # [B, T]
    buf: torch.Tensor  # [B, S + padding]: exp(logit - max) in the first S columns, 0 after; used once, in place
    inv_total: torch.Tensor  # [B] 1 / softmax denominator
    dlogit_true: torch.Tensor  # [B, T] softmax minus target of the true logits (0 where padded)


class _CpuSampledSoftmax:
    def forward(self, p, need_grad: bool):
        dt = compute_dtype(p.x.dtype)
        labels, true_expected = autograd_.labels_2d(p)
        ids, ids_ok = autograd_.sampled_ids(p)
        sampled_expected = p.sampled[2]
        B, T = labels.shape
        S, H = len(ids), p.x.shape[1]
        valid = labels >= 0
        safe = labels.clamp(min=0)
        x = p.x.to(dt)

        w_sampled = torch.empty(padded_row_stride(S, torch.empty((), dtype=dt).element_size()), H,
                                dtype=p.weight.dtype)
        torch.index_select(p.weight, 0, ids, out=w_sampled[:S])
        w_sampled[S:] = 0.0  # only the padding rows: the others are written by the gather
        w_sampled = w_sampled.to(dt)
        w_true = p.weight.index_select(0, safe.reshape(-1)).to(dt).view(B, T, H)
        # [B, S + padding]; on real tensors in the kept host scratch (given back once the gradient GEMMs have read
        # it) and walked by the C++ row passes, under tracing (a compiled sparse_grad call) by torch ops
        eager = _eager(x) and _eager(w_sampled)
        if eager:
            buf = take_workspace(B * w_sampled.shape[0], dt, "cpu")[:B * w_sampled.shape[0]]
            buf = buf.view(B, w_sampled.shape[0])
            torch.mm(x, w_sampled.t(), out=buf)
        else:
            buf = x @ w_sampled.t()
        true_logits = torch.bmm(w_true, x[:, :, None]).squeeze(2)  # [B, T]
        # bias and -log Q as one per-column shift: a single pass over the buffer
        shift = None
        if p.bias is not None:
            shift = torch.zeros(buf.shape[1], dtype=dt)
            shift[:S] = p.bias.index_select(0, ids)
            true_logits += p.bias.index_select(0, safe.reshape(-1)).to(dt).view(B, T)
        if p.subtract_log_q:
            if shift is None:
                shift = torch.zeros(buf.shape[1], dtype=dt)
            shift[:S] -= torch.log(sampled_expected.to(dt))
            true_logits -= torch.log(true_expected.to(dt))
        if not eager or not bool(ids_ok.all()):  # ids out of range (a direct op call): masked by the shift
            if shift is None:
                shift = torch.zeros(buf.shape[1], dtype=dt)
            shift[:S].masked_fill_(~ids_ok, -math.inf)
        logits = buf[:, :S]  # a view: the work below happens in place in buf
        true_logits.masked_fill_(~valid, -math.inf)
        if p.remove_accidental_hits:  # before the shift: -inf + shift stays -inf
            hit_rows, hit_cols = autograd_.accidental_hits(labels, p.sampled[0].long(), p.accidental_hits)
            logits.index_put_((hit_rows, hit_cols), torch.tensor(-math.inf, dtype=dt))

        # the front gives every row a valid true label (then the max is finite and the sum >= 1)
        true_max = true_logits.amax(dim=1)
        if dt == torch.float32 and eager:  # one C++ pass per row: shift, max, exp in place, sum, padding zeroed
            m, sampled_sum = torch.empty(B, dtype=dt), torch.empty(B, dtype=dt)
            _C.sampled_rows_exp(buf.data_ptr(), buf.stride(0), B, S, buf.shape[1] - S,
                                0 if shift is None else shift.data_ptr(), true_max.data_ptr(), m.data_ptr(),
                                sampled_sum.data_ptr())
        else:
            if shift is not None:
                logits += shift[:S]
            m = torch.maximum(logits.amax(dim=1), true_max)
            sampled_sum = logits.sub_(m[:, None]).exp_().sum(dim=1)
            buf[:, S:] = 0.0  # padding columns take no part in the gradient GEMMs
        prob_true = (true_logits - m[:, None]).exp_()
        total = sampled_sum + prob_true.sum(dim=1)
        target = valid.to(dt) / valid.sum(dim=1, keepdim=True).clamp(min=1).to(dt)
        picked = torch.where(valid, true_logits, torch.zeros((), dtype=dt)) * target
        per_row = m + torch.log(total) - picked.sum(dim=1)
        if not need_grad:
            if eager:
                give_back_workspace(buf)
            return per_row, None
        inv_total = total.reciprocal_()
        dlogit_true = prob_true.mul_(inv_total[:, None]).sub_(target)  # 0 - 0 where padded
        return per_row, _State(x, w_sampled, ids, w_true, labels, valid, buf, inv_total, dlogit_true)

    def gradients(self, s: _State, scale: torch.Tensor, need_x: bool) -> RowGradients:
        S = len(s.ids)
        d = s.buf  # softmax normalisation and row scale in one pass, the bias gradient's column sums with it
        row_scale = (s.inv_total * scale).to(d.dtype).contiguous()
        eager = _eager(d)
        if d.dtype == torch.float32 and eager:
            dbias = torch.zeros(S, dtype=d.dtype)
            _C.sampled_rows_scale(d.data_ptr(), d.stride(0), d.shape[0], S, row_scale.data_ptr(), dbias.data_ptr())
        else:
            d.mul_(row_scale[:, None])
            dbias = d[:, :S].sum(dim=0)
        d_true = s.dlogit_true * scale[:, None]  # [B, T]
        dx = None
        if need_x:
            dx = d @ s.w_sampled
            dx += torch.bmm(d_true[:, None, :], s.w_true).squeeze(1)
        rows_b, rows_t = s.valid.nonzero(as_tuple=True)
        d_pair = d_true[rows_b, rows_t]
        dw_sampled = d.t()[:S] @ s.x
        if eager:
            give_back_workspace(s.buf)
        s.buf = None  # gradients are made once (a second backward makes its state again)
        return RowGradients(dx, [s.ids, s.labels[rows_b, rows_t]], [dw_sampled, d_pair[:, None] * s.x[rows_b]],
                            [dbias, d_pair])


IMPL = _CpuSampledSoftmax()
