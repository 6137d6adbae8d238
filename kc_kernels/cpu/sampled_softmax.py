"""Sampled softmax on CPU.

One gather of the sampled and true weight rows, one GEMM x @ W_S^T for the [B, S] sampled logits (S << V, so the
buffer is small), the true logits as row-wise dots, then one in-place pass over the buffer that yields the loss and
the softmax probabilities, which are dlogits for the sampled columns (their target is 0; masked entries have
probability 0 and so zero gradient). The gradient GEMMs dx = dlogits @ W_rows and dW_rows = dlogits^T @ x touch
only the gathered rows. Half inputs are upcast to fp32 after the gather, so only [S + B*T, H] rows are converted.
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
    w_sampled: torch.Tensor  # [S, H]
    w_true: torch.Tensor  # [B, T, H]
    ids: torch.Tensor  # [S]
    labels: torch.Tensor  # [B, T]
    valid: torch.Tensor  # [B, T] bool
    prob_sampled: torch.Tensor  # [B, S] softmax probabilities of the sampled columns
    dlogit_true: torch.Tensor  # [B, T] softmax minus target of the true columns (0 where padded)
    has_bias: bool


class _CpuSampledSoftmax:
    def forward(self, p, need_grad: bool):
        dt = autograd_.compute_dtype(p.x.dtype)
        labels, true_expected = autograd_.labels_2d(p)
        ids, _, sampled_expected = p.sampled
        ids = ids.long()
        B, T = labels.shape
        S, H = len(ids), p.x.shape[1]
        valid = labels >= 0
        rows = torch.cat([ids, labels.clamp(min=0).reshape(-1)])
        w_rows = p.weight.index_select(0, rows).to(dt)
        w_sampled, w_true = w_rows[:S], w_rows[S:].view(B, T, H)
        x = p.x.to(dt)

        logits = x @ w_sampled.t()  # [B, S]
        true_logits = torch.bmm(w_true, x[:, :, None]).squeeze(2)  # [B, T]
        if p.bias is not None:
            b_rows = p.bias.index_select(0, rows).to(dt)
            logits += b_rows[:S]
            true_logits += b_rows[S:].view(B, T)
        if p.subtract_log_q:
            logits -= torch.log(sampled_expected.to(dt))
            true_logits -= torch.log(true_expected.to(dt))
        true_logits.masked_fill_(~valid, -math.inf)
        if p.remove_accidental_hits:
            hit_rows, hit_cols = autograd_.accidental_hits(labels, ids)
            logits.index_put_((hit_rows, hit_cols), torch.tensor(-math.inf, dtype=dt))

        # every row has a valid true label, so the max is finite and the sum >= 1
        m = torch.maximum(logits.amax(dim=1), true_logits.amax(dim=1))
        prob = logits.sub_(m[:, None]).exp_()  # in place: the logits are not needed again
        prob_true = (true_logits - m[:, None]).exp_()
        total = prob.sum(dim=1) + prob_true.sum(dim=1)
        num_true = valid.sum(dim=1, keepdim=True).to(dt)
        target = valid.to(dt) / num_true
        picked = torch.where(valid, true_logits, torch.zeros((), dtype=dt)) * target
        per_row = m + torch.log(total) - picked.sum(dim=1)
        if not need_grad:
            return per_row, None
        inv_total = total.reciprocal_()[:, None]
        prob.mul_(inv_total)
        dlogit_true = prob_true.mul_(inv_total).sub_(target)
        return per_row, _State(x, w_sampled, w_true, ids, labels, valid, prob, dlogit_true, p.bias is not None)

    def gradients(self, s: _State, scale: torch.Tensor, need_x: bool) -> RowGradients:
        d_sampled = s.prob_sampled.mul_(scale[:, None])  # [B, S]; in place: the state is used once
        d_true = s.dlogit_true.mul_(scale[:, None])  # [B, T]
        dx = None
        if need_x:
            dx = d_sampled @ s.w_sampled
            dx += torch.bmm(d_true[:, None, :], s.w_true).squeeze(1)
        dw_sampled = d_sampled.t() @ s.x  # [S, H]
        d_true_valid = d_true[s.valid]  # padded entries touch no row
        x_true = s.x[:, None, :].expand(-1, s.labels.shape[1], -1)[s.valid]
        return RowGradients(dx, [s.ids, s.labels[s.valid]], [dw_sampled, x_true.mul_(d_true_valid[:, None])],
                            [d_sampled.sum(dim=0), d_true_valid])


_IMPL = _CpuSampledSoftmax()


def sampled_softmax_loss(p) -> torch.Tensor:
    if p.x.device.type != "cpu":
        raise ValueError(f"x: the cpu backend takes CPU tensors, got device {p.x.device}")
    return autograd_.apply(p, _IMPL)
