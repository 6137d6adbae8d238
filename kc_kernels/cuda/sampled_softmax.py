"""Sampled softmax on CUDA: torch's GEMMs around one kernel (csrc/cuda/sampled_softmax.cu).

The logits are gathered into two fp32 buffers: the true labels' [B, T] (each row against its own label rows of the
weight, a batched GEMV) and the sampled classes' [B, S] (one GEMM against the sampled rows, S << V), with the bias
and -log Q added and -inf where masked (padding labels, accidental hits). The kernel gives the per-row loss; for
the gradients it overwrites both buffers in place by coef_b (softmax - target), and dx, dW and dbias are GEMMs and
row sums on them. Half inputs are upcast after the gather, so only the gathered rows are converted. The gradient
step runs the kernel a second time rather than keeping the softmax from the forward: the per-row coefficients
(sample weight, reduction, grad_output) are only known then, and the extra pass is over [B, S], not [B, V].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from kc_kernels import _cuda
from kc_kernels.ops import sampled_softmax_autograd as autograd_
from kc_kernels.ops.sampled_softmax_autograd import RowGradients

__all__ = ["IMPL"]


@dataclass
class _State:
    x: torch.Tensor  # [B, H] fp32
    w_sampled: torch.Tensor  # [S, H] fp32 weight rows of the sampled classes
    w_true: torch.Tensor  # [B, T, H] fp32 weight rows of each row's labels (row 0 where padded)
    ids: torch.Tensor  # [S] int64
    labels: torch.Tensor  # [B, T] int64, -1 padding
    valid: torch.Tensor  # [B, T] labels >= 0
    true_logits: torch.Tensor  # [B, T] fp32, -inf where padded; becomes its gradient in place (used once)
    sampled_logits: torch.Tensor  # [B, S] fp32, -inf at accidental hits; likewise


def _softmax_rows(true_logits: torch.Tensor, sampled_logits: torch.Tensor, loss: Optional[torch.Tensor],
                  coef: Optional[torch.Tensor]) -> None:
    """The kernel: loss[b] when ``loss`` is given; with ``coef`` both buffers become coef_b (softmax - target)."""
    p = _cuda.SampledSoftmaxParams()
    p.rows = true_logits.shape[0]
    p.true_logits, p.num_true, p.true_row_stride = true_logits.data_ptr(), true_logits.shape[1], true_logits.stride(0)
    p.sampled_logits, p.num_sampled = sampled_logits.data_ptr(), sampled_logits.shape[1]
    p.sampled_row_stride = sampled_logits.stride(0)
    p.loss = 0 if loss is None else loss.data_ptr()
    p.coef = 0 if coef is None else coef.data_ptr()
    device = true_logits.device
    with torch.cuda.device(device):
        p.stream = torch.cuda.current_stream(device).cuda_stream
        _cuda.sampled_softmax(p)


class _CudaSampledSoftmax:
    def forward(self, p, need_grad: bool):
        labels, true_expected = autograd_.labels_2d(p)
        ids, ids_ok = autograd_.sampled_ids(p)  # gathered in range; the columns of ids outside get -inf below
        valid = labels >= 0
        label_rows = labels.clamp(min=0)
        x = p.x.float().contiguous()
        w_sampled = p.weight.index_select(0, ids).float()
        w_true = p.weight[label_rows].float()  # [B, T, H]

        sampled_logits = x @ w_sampled.t()  # [B, S]
        true_logits = torch.bmm(w_true, x[:, :, None])[:, :, 0].contiguous()  # [B, T]
        if p.bias is not None:
            sampled_logits += p.bias.index_select(0, ids).float()
            true_logits += p.bias[label_rows].float()
        if p.subtract_log_q:
            sampled_logits -= torch.log(p.sampled[2].float())
            true_logits -= torch.log(true_expected.float())
        true_logits.masked_fill_(~valid, -math.inf)
        sampled_logits.masked_fill_(~ids_ok[None, :], -math.inf)
        if p.remove_accidental_hits:
            hit_rows, hit_cols = autograd_.accidental_hits(labels, p.sampled[0].long(), p.accidental_hits)
            sampled_logits.index_put_((hit_rows, hit_cols), torch.tensor(-math.inf, device=x.device))

        loss = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        _softmax_rows(true_logits, sampled_logits, loss, None)
        if not need_grad:
            return loss, None
        return loss, _State(x, w_sampled, w_true, ids, labels, valid, true_logits, sampled_logits)

    def gradients(self, s: _State, scale: torch.Tensor, need_x: bool) -> RowGradients:
        _softmax_rows(s.true_logits, s.sampled_logits, None, scale.float().contiguous())
        d_sampled, d_true = s.sampled_logits, s.true_logits  # now coef_b (softmax - target); 0 where masked
        dx = None
        if need_x:
            dx = d_sampled @ s.w_sampled
            dx += torch.bmm(d_true[:, None, :], s.w_true)[:, 0]
        d_true_valid = d_true[s.valid]
        T = s.labels.shape[1]
        x_rows = s.x[:, None, :].expand(-1, T, -1)[s.valid] * d_true_valid[:, None]  # dW of each label's row
        return RowGradients(dx, [s.ids, s.labels[s.valid]], [d_sampled.t() @ s.x, x_rows],
                            [d_sampled.sum(dim=0), d_true_valid])


IMPL = _CudaSampledSoftmax()
