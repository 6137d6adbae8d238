"""Sampled softmax on Triton: launchers around kc_kernels/triton/_sampled_softmax_kernels.py.

The forward kernel reads the sampled weight rows through ``ids`` (no gathered copy) and keeps an online
logsumexp, so nothing [B, S] is written for the loss. The gradient step recomputes the logits tile by tile into
a [B, S] dlogits buffer (S << V), then two tiled GEMM kernels give dx and the sampled rows' dW. The true labels'
gradient rows (B*T of them, row-scaled copies of x) and the bias sums are small and done in torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kc_kernels.ops import sampled_softmax_autograd as autograd_
from kc_kernels.ops.sampled_softmax_autograd import RowGradients
from kc_kernels.reduction import compute_dtype
from kc_kernels.triton._sampled_softmax_kernels import (
    _sampled_softmax_dlogits_kernel,
    _sampled_softmax_dw_kernel,
    _sampled_softmax_dx_kernel,
    _sampled_softmax_fwd_kernel,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_ACC = {torch.float64: tl.float64}


# largest (BLOCK_B, BLOCK_S, BLOCK_H): the interpreter pays per program, so it gets big blocks
BLOCK_CAPS = (64, 128, 128) if _INTERPRET else (64, 64, 64)


def _blocks(B: int, S: int, H: int):
    """One configuration (BLOCK_B, BLOCK_S, BLOCK_H, num_warps), no autotuning; tl.dot needs every block >= 16."""
    cap_b, cap_s, cap_h = BLOCK_CAPS

    def fit(n, cap):
        return max(16, min(cap, triton.next_power_of_2(n)))

    return fit(B, cap_b), fit(S, cap_s), fit(H, cap_h), 4


# splits of the samples in the forward kernel; None: enough programs to fill the GPU (1 under the interpreter)
FWD_SPLITS = None


def _num_splits(row_blocks: int, s_tiles: int, device: torch.device) -> int:
    if FWD_SPLITS is not None:
        want = FWD_SPLITS
    elif _INTERPRET or device.type != "cuda":
        want = 1
    else:
        want = 2 * torch.cuda.get_device_properties(device).multi_processor_count // row_blocks
    return max(1, min(want, s_tiles))


@dataclass
class _State:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor  # x itself as a dummy pointer when there is no bias
    ids: torch.Tensor
    logq_sampled: torch.Tensor
    labels: torch.Tensor  # [B, T] int64 contiguous
    last: torch.Tensor  # [S] int8, 1 at the last copy of each id (accidental_hits="tensorflow"), else a dummy
    valid: torch.Tensor
    lse: torch.Tensor
    true_logits: torch.Tensor  # [B, T], -inf where padded
    consts: dict


class _TritonSampledSoftmax:
    def forward(self, p, need_grad: bool):
        x, weight = p.x, p.weight
        if x.stride(1) != 1:
            x = x.contiguous()
        if weight.stride(1) != 1:
            weight = weight.contiguous()
        acc_dtype = compute_dtype(x.dtype)
        labels, true_expected = autograd_.labels_2d(p)
        labels = labels.contiguous()
        ids = p.sampled[0].long().contiguous()  # read as given: the kernels mask ids outside [0, V)
        B, T = labels.shape
        V = weight.shape[0]
        S, H = len(ids), x.shape[1]
        dev = x.device
        has_bias = p.bias is not None
        bias = p.bias.contiguous() if has_bias else x
        if p.subtract_log_q:
            logq_s = torch.log(p.sampled[2].to(acc_dtype)).contiguous()
            logq_t = torch.log(true_expected.to(acc_dtype)).contiguous()
        else:
            logq_s = logq_t = torch.empty(1, dtype=acc_dtype, device=dev)
        BB, BS, BH, warps = _blocks(B, S, H)
        row_blocks, s_tiles = triton.cdiv(B, BB), triton.cdiv(S, BS)
        tiles_per_split = triton.cdiv(s_tiles, _num_splits(row_blocks, s_tiles, dev))
        splits = triton.cdiv(s_tiles, tiles_per_split)
        lse_part = torch.empty(splits, B, dtype=acc_dtype, device=dev)
        picked = torch.empty(B, dtype=acc_dtype, device=dev)
        true_logits = torch.empty(B, T, dtype=acc_dtype, device=dev)
        last_copy_only = autograd_.hit_mode(p) == "tensorflow"
        last = autograd_.last_copies(ids).to(torch.int8) if last_copy_only else labels
        consts = dict(HAS_BIAS=has_bias, SUBTRACT_LOG_Q=p.subtract_log_q, REMOVE_HITS=p.remove_accidental_hits,
                      LAST_COPY_ONLY=last_copy_only,
                      IEEE=x.dtype in (torch.float32, torch.float64), ACC=_ACC.get(x.dtype, tl.float32),
                      BLOCK_B=BB, BLOCK_S=BS, BLOCK_H=BH)
        _sampled_softmax_fwd_kernel[(row_blocks, splits)](
            x, weight, bias, ids, logq_s, labels, last, logq_t, lse_part, picked, true_logits, B, S, H, T, V,
            tiles_per_split, x.stride(0), weight.stride(0), num_warps=warps, **consts)
        lse = torch.logsumexp(lse_part, dim=0) if splits > 1 else lse_part[0]
        per_row = lse - picked
        if not need_grad:
            return per_row, None
        return per_row, _State(x, weight, bias, ids, logq_s, labels, last, labels >= 0, lse, true_logits,
                               dict(consts, num_warps=warps))

    def gradients(self, s: _State, scale: torch.Tensor, need_x: bool) -> RowGradients:
        x, weight, labels = s.x, s.weight, s.labels
        B, T = labels.shape
        S, H = len(s.ids), x.shape[1]
        c = s.consts
        BB, BS, BH = c["BLOCK_B"], c["BLOCK_S"], c["BLOCK_H"]
        acc_dtype = s.lse.dtype
        scale = scale.to(acc_dtype).contiguous()
        dlogits = torch.empty(B, S, dtype=acc_dtype, device=x.device)
        _sampled_softmax_dlogits_kernel[(triton.cdiv(B, BB), triton.cdiv(S, BS))](
            x, weight, s.bias, s.ids, s.logq_sampled, labels, s.last, s.lse, scale, dlogits, B, S, H, T,
            weight.shape[0], x.stride(0), weight.stride(0), **c)
        # the true columns: softmax minus 1/num_true (exp(-inf) = 0 where padded)
        num_true = s.valid.sum(dim=1, keepdim=True).clamp(min=1).to(acc_dtype)
        d_true = (torch.exp(s.true_logits - s.lse[:, None]) - s.valid.to(acc_dtype) / num_true) * scale[:, None]
        d_true = d_true.contiguous()
        gemm = dict(IEEE=c["IEEE"], ACC=c["ACC"], BLOCK_B=BB, BLOCK_S=BS, BLOCK_H=BH, num_warps=c["num_warps"])
        dx = None
        if need_x:
            dx = torch.empty(B, H, dtype=acc_dtype, device=x.device)
            _sampled_softmax_dx_kernel[(triton.cdiv(B, BB), triton.cdiv(H, BH))](
                dlogits, d_true, weight, s.ids, labels, dx, B, S, H, T, weight.shape[0], weight.stride(0), **gemm)
        dw_sampled = torch.empty(S, H, dtype=acc_dtype, device=x.device)
        _sampled_softmax_dw_kernel[(triton.cdiv(S, BS), triton.cdiv(H, BH))](
            dlogits, x, dw_sampled, B, S, H, x.stride(0), **gemm)
        d_true_valid = d_true[s.valid]
        x_rows = x.to(acc_dtype)[:, None, :].expand(-1, T, -1)[s.valid]
        # an id outside [0, V) has a zero column of dlogits: its (zero) weight-gradient row goes to class 0
        ids = torch.where((s.ids >= 0) & (s.ids < weight.shape[0]), s.ids, torch.zeros_like(s.ids))
        return RowGradients(dx, [ids, labels[s.valid]], [dw_sampled, x_rows.mul_(d_true_valid[:, None])],
                            [dlogits.sum(dim=0), d_true_valid])


IMPL = _TritonSampledSoftmax()
