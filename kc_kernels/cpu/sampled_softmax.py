"""Sampled softmax on CPU.

The touched classes form one column set: the sampled ids, then the true labels that were not sampled. One gather
of their weight rows and one GEMM give the logits of every column ([B, S + E] with E <= B*T; S << V, so the
buffer is small); a row's true logits are picked out of it. One in-place pass over the sampled columns gives the
loss and the softmax probabilities, which are dlogits there (the sampled targets are 0; masked entries have
probability 0). The true columns' gradient (softmax minus 1/num_true) is added into the same buffer at each
label's column, so the gradients are two GEMMs on it: dx = D @ W_cols and dW_cols = D^T @ x. With unique
sampling the columns are distinct classes, so the weight gradient needs no scatter-add. Half inputs are upcast
to fp32 after the gather, so only the gathered rows are converted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kc_kernels.ops import sampled_softmax_autograd as autograd_
from kc_kernels.ops.sampled_softmax_autograd import RowGradients


@dataclass
class _State:
    x: torch.Tensor  # [B, H] compute dtype
    w_cols: torch.Tensor  # [C, H] weight rows of the columns
    cols: torch.Tensor  # [C] class of each column: ids, then labels that were not sampled
    distinct: bool  # cols holds no class twice
    buf: torch.Tensor  # [B, C]: exp(logit - max) in the first S columns, 0 in the others; used once, in place
    inv_total: torch.Tensor  # [B] 1 / softmax denominator
    flat_pos: torch.Tensor  # [N] offsets into buf of the valid (row, label) pairs
    dlogit_true: torch.Tensor  # [N] softmax minus target of those pairs


def _columns(ids: torch.Tensor, labels: torch.Tensor):
    """(cols [C], column of every label [B, T] (0 where padded), cols are distinct)."""
    S = len(ids)
    sorted_ids, order = torch.sort(ids)
    distinct = not bool((sorted_ids[1:] == sorted_ids[:-1]).any())
    flat = labels.reshape(-1).contiguous()  # searchsorted warns on (and copies) strided input
    valid = flat >= 0
    at = torch.searchsorted(sorted_ids, flat).clamp_(max=S - 1)
    sampled = valid & (sorted_ids[at] == flat)
    pos = torch.where(sampled, order[at], torch.zeros_like(flat))
    missing = valid & ~sampled
    extra, extra_col = torch.unique(flat[missing], return_inverse=True)
    pos[missing] = S + extra_col
    return torch.cat([ids, extra]), pos.view(labels.shape), distinct


class _CpuSampledSoftmax:
    def forward(self, p, need_grad: bool):
        dt = autograd_.compute_dtype(p.x.dtype)
        labels, true_expected = autograd_.labels_2d(p)
        ids, _, sampled_expected = p.sampled
        ids = ids.long()
        B, T = labels.shape
        S = len(ids)
        valid = labels >= 0
        cols, pos, distinct = _columns(ids, labels)
        w_cols = p.weight.index_select(0, cols).to(dt)
        x = p.x.to(dt)

        buf = x @ w_cols.t()  # [B, C]
        true_logits = buf.gather(1, pos)  # [B, T], before the per-column shift below
        # bias and -log Q as one per-column shift: a single pass over the buffer
        shift = None
        if p.bias is not None:
            shift = p.bias.index_select(0, cols).to(dt)
            true_logits += shift[pos]
        if p.subtract_log_q:
            if shift is None:
                shift = torch.zeros(len(cols), dtype=dt)
            shift[:S] -= torch.log(sampled_expected.to(dt))
            true_logits -= torch.log(true_expected.to(dt))
        if shift is not None:
            buf += shift
        logits = buf[:, :S]  # a view: the work below happens in place in buf
        true_logits.masked_fill_(~valid, -math.inf)
        if p.remove_accidental_hits:
            hit_rows, hit_cols = autograd_.accidental_hits(labels, ids)
            logits.index_put_((hit_rows, hit_cols), torch.tensor(-math.inf, dtype=dt))

        # every row has a valid true label, so the max is finite and the sum >= 1
        m = torch.maximum(logits.amax(dim=1), true_logits.amax(dim=1))
        prob = logits.sub_(m[:, None]).exp_()
        prob_true = (true_logits - m[:, None]).exp_()
        total = prob.sum(dim=1) + prob_true.sum(dim=1)
        target = valid.to(dt) / valid.sum(dim=1, keepdim=True).to(dt)
        picked = torch.where(valid, true_logits, torch.zeros((), dtype=dt)) * target
        per_row = m + torch.log(total) - picked.sum(dim=1)
        if not need_grad:
            return per_row, None
        inv_total = total.reciprocal_()
        buf[:, S:] = 0.0  # label-only columns: only the true gradient lands there
        dlogit_true = prob_true.mul_(inv_total[:, None]).sub_(target)
        row_start = torch.arange(B)[:, None] * buf.shape[1]
        return per_row, _State(x, w_cols, cols, distinct, buf, inv_total, (row_start + pos)[valid],
                               dlogit_true[valid])

    def gradients(self, s: _State, scale: torch.Tensor, need_x: bool) -> RowGradients:
        d = s.buf.mul_((s.inv_total * scale)[:, None])  # softmax normalisation and row scale in one pass
        row_of_pair = torch.div(s.flat_pos, d.shape[1], rounding_mode="floor")
        d.view(-1).index_add_(0, s.flat_pos, s.dlogit_true * scale[row_of_pair])
        dx = d @ s.w_cols if need_x else None
        return RowGradients(dx, [s.cols], [d.t() @ s.x], [d.sum(dim=0)], distinct=s.distinct)


_IMPL = _CpuSampledSoftmax()
autograd_.register_impl("cpu", _IMPL)


def sampled_softmax_loss(p) -> torch.Tensor:
    if p.x.device.type != "cpu":
        raise ValueError(f"x: the cpu backend takes CPU tensors, got device {p.x.device}")
    return autograd_.run(p, _IMPL, "cpu")
