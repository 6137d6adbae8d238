"""Triton backend of linear_soft_target_loss and soft_target_loss (semantics: ../shared/DESIGN.md).

Forward: [a norm pass when the self-paced scale is on, giving the per-(row, segment) L2 norms], then one loss pass
writing per-(row, chunk) statistics (_soft_target_fwd.py); the host merges the chunks of each segment (online
logsumexp merge) into per-(row, segment) numbers. Extra memory: the statistics, [6, B, C] fp32 with C = V / 1024 + G
chunks (so many tiny segments cost O(B * G)), the fp32 accumulators of dx and dW, and [B, G] per-segment numbers;
never a [B, V] buffer (except the gradient of given logits, which is the op's output).
Backward: one kernel over (row block, class tile) recomputes the logits and accumulates dx, dW, dbias, dscale with
fp32 atomics (_soft_target_bwd.py).

Targets are read inside the kernels: dense teacher logits tile by tile; sparse targets as each row's targets sorted
by class, walked with a per-row cursor as the tiles advance (_soft_target_tiles.py), so that -z*y and its gradient
are part of the same tiles and no gather of weight rows is needed.

Dtypes: fp32, fp16 and bf16 inputs; statistics, loss and gradient accumulators are fp32 and the gradients are cast
back to the input dtypes. fp32 inputs use IEEE fp32 dots (no tf32), so fp32 results match fp32 references.
float64 is rejected (Triton's dot has no fast fp64 path; the cpu and reference backends take fp64).
dL/du is cast to the input dtype for the tensor-core dots of dx and dW; the mean's 1/B and the upstream gradient
are applied to the fp32 accumulators afterwards, so fp16 does not underflow on them. The atomics make dx and dW sums
run-order dependent (close, not bitwise reproducible).
"""
from __future__ import annotations

import torch

from kc_kernels.reference import NORM_EPS
from kc_kernels.triton._soft_target_bwd import NCOEF, launch_bwd
from kc_kernels.triton._soft_target_fwd import NSTAT, launch_fwd
from kc_kernels.triton._soft_target_tiles import chunk_table, interpreted

__all__ = ["linear_soft_target_loss", "soft_target_loss"]


def _chunk_lengths():
    """(forward chunk, backward chunk) in classes. A forward program reduces a whole chunk online, so long chunks
    mean few statistics to merge; a backward program handles one chunk, so short chunks mean many programs.
    Tile sizes are the autotuner's; a chunk need not be a multiple of them."""
    return (128, 64) if interpreted() else (1024, 128)


def _segment_ids(bounds, device) -> torch.Tensor:
    b = torch.tensor(bounds, dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(len(bounds) - 1), b[1:] - b[:-1]).to(device)


def _seg_sum(values: torch.Tensor, chunk_seg: torch.Tensor, G: int) -> torch.Tensor:
    return values.new_zeros(values.shape[0], G).index_add_(1, chunk_seg, values)


def _seg_max(values: torch.Tensor, chunk_seg: torch.Tensor, G: int) -> torch.Tensor:
    out = values.new_full((values.shape[0], G), float("-inf"))
    return out.scatter_reduce_(1, chunk_seg.expand_as(values), values, reduce="amax")


def _sorted_targets(target_index, target_value, V):
    """Each row's targets sorted by class (int32, padding -> V, past every tile) and their values (fp32, 0 for
    padding)."""
    keep = target_index >= 0
    idx = torch.where(keep, target_index.long(), torch.full_like(target_index.long(), V))
    val = torch.where(keep, target_value.float(), torch.zeros((), device=idx.device))
    idx, order = torch.sort(idx, dim=1)
    val = val.gather(1, order)
    K = idx.shape[1]
    if K == 0:  # kernels need real pointers; K=0 keeps every cursor empty
        idx = torch.full((idx.shape[0], 1), V, dtype=torch.int64, device=idx.device)
        val = torch.zeros(idx.shape, dtype=torch.float32, device=idx.device)
    return idx.to(torch.int32).contiguous(), val.contiguous()


def _check_dtype(name: str, t: torch.Tensor):
    if t.dtype == torch.float64:
        raise ValueError(f"{name}: the triton backend takes float32, float16 or bfloat16, not float64 "
                         "(use backend='cpu' or 'reference' for float64)")


class _SoftTargetFunction(torch.autograd.Function):
    """Loss of (x, weight, bias) or of given logits; gradients to all of them and to the scale."""

    @staticmethod
    def forward(ctx, p, skip_below, x, weight, bias, logits, scale):
        B, V, G = p.batch, p.num_classes, p.num_segments
        dev = (logits if logits is not None else x).device
        from_logits = logits is not None
        grouped = p.grouped
        softmax = p.mode == "softmax"
        T = float(p.temperature)
        inv_temp = 1.0 / T
        if from_logits:
            logits = logits.contiguous()
            H = 0
        else:
            x, weight = x.contiguous(), weight.contiguous()
            bias = bias.contiguous() if bias is not None else None
            H = x.shape[-1]
        teacher = p.teacher_logits.contiguous() if p.teacher_logits is not None else None
        seg_of_class = _segment_ids(p.bounds, dev)
        gamma = None
        if scale is not None:
            gamma = scale.float() if p.scale_per_class else scale.float()[seg_of_class]
            gamma = gamma.contiguous()
        chunks = chunk_table(p.bounds, _chunk_lengths()[0], dev)
        cseg = chunks[2]
        C = cseg.numel()
        common = dict(x=x, w=weight, bias=bias, logits=logits, B=B, H=H, G=G, inv_temp=inv_temp,
                      softmax=softmax, grouped=grouped)
        sparse = None
        if teacher is None:
            sparse = _sorted_targets(p.target_index, p.target_value, V)

        inv_n = None
        if gamma is not None:
            sq = torch.empty(1, B, C, dtype=torch.float32, device=dev)
            launch_fwd(teacher=None, sparse=None, gamma=None, inv_norm=None, chunks=chunks, stats=sq, norm_pass=True,
                       **common)
            inv_n = torch.rsqrt(_seg_sum(sq[0], cseg, G) + NORM_EPS).contiguous()

        st = torch.empty(NSTAT if softmax else 3, B, C, dtype=torch.float32, device=dev)
        launch_fwd(teacher=teacher, sparse=sparse, gamma=gamma, inv_norm=inv_n, chunks=chunks, stats=st,
                   norm_pass=False, **common)

        lse = tlse = None
        if softmax:
            m = _seg_max(st[0], cseg, G)
            w_c = torch.exp(st[0] - m[:, cseg])
            s = _seg_sum(st[1] * w_c, cseg, G)
            lse = m + torch.log(s)
            pred_y = _seg_sum(st[2] * w_c, cseg, G) / s  # sum_j softmax_j * y_j per segment
            if teacher is not None:
                tm = _seg_max(st[3], cseg, G)
                tm = torch.where(tm == float("-inf"), torch.zeros_like(tm), tm)
                tw_c = torch.exp(st[3] - tm[:, cseg])
                ts = _seg_sum(st[4] * tw_c, cseg, G)
                tlse = tm + torch.log(ts)
                zy = _seg_sum(st[5] * tw_c, cseg, G) / ts
            else:
                zy = _seg_sum(st[5], cseg, G)
        else:
            softplus_sum = _seg_sum(st[0], cseg, G)
            pred_y = _seg_sum(st[1], cseg, G)  # sum_j sigmoid(y_j) * y_j per segment
            zy = _seg_sum(st[2], cseg, G)

        if sparse is not None:  # target mass per segment (softmax mode)
            seg_k = seg_of_class[sparse[0].long().clamp_max(V - 1)]
            mass = torch.zeros(B, G, dtype=torch.float32, device=dev).scatter_add_(1, seg_k, sparse[1])
        else:
            mass = torch.ones(B, G, dtype=torch.float32, device=dev)

        if softmax:
            per_row = T * T * (mass * lse - zy).sum(1)
            r_sum = T * T * (mass * pred_y - zy)  # sum_j dl/dy_j * y_j per segment
        else:
            per_row = (softplus_sum - zy).sum(1)
            r_sum = pred_y - zy
        sw = p.sample_weight.float() if p.sample_weight is not None else None
        loss = per_row * sw if sw is not None else per_row
        if p.reduction == "sum":
            loss = loss.sum()
        elif p.reduction == "mean":
            loss = loss.sum() / B

        ctx.p, ctx.skip_below = p, skip_below
        idx_s, val_s = (sparse[0], sparse[1]) if sparse is not None else (None, None)
        ctx.save_for_backward(x, weight, bias, logits, scale, teacher, idx_s, val_s, gamma, inv_n, lse, tlse, mass,
                              r_sum, sw)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        p = ctx.p
        (x, weight, bias, logits, scale, teacher, idx_s, val_s, gamma, inv_n, lse, tlse, mass, r_sum,
         sw) = ctx.saved_tensors
        sparse = (idx_s, val_s) if idx_s is not None else None
        _, _, need_x, need_w, need_b, need_logits, need_scale = ctx.needs_input_grad
        B, V, G = p.batch, p.num_classes, p.num_segments
        from_logits = logits is not None
        dev = (logits if from_logits else x).device
        softmax = p.mode == "softmax"
        T = float(p.temperature)
        inv_temp = 1.0 / T
        zf = T * T if softmax else 1.0  # the loss's factor on -z * y

        # row factor c_b; a global factor (1/B of "mean", the upstream scalar) is applied to the fp32 accumulators
        # afterwards so that dL/du stays far from fp16's underflow when it is cast for the tensor-core dots
        go = grad_loss.float()
        c = sw if sw is not None else torch.ones(B, dtype=torch.float32, device=dev)
        post = None
        if p.reduction == "none":
            c = c * go
        else:
            post = go / B if p.reduction == "mean" else go
            if from_logits:
                c, post = c * post, None

        coef = torch.zeros(NCOEF, B, G, dtype=torch.float32, device=dev)
        coef[0] = c[:, None] * (zf * mass if softmax else 1.0)
        coef[1] = c[:, None] * zf
        if softmax:
            coef[2] = lse
            if tlse is not None:
                coef[3] = tlse
        if gamma is not None:
            coef[4] = inv_n
            coef[5] = c[:, None] * r_sum * inv_n * inv_n

        dx = dw = dbias = dlogits = None
        if from_logits:
            dlogits = torch.empty_like(logits)
        else:
            if need_x:
                dx = torch.zeros(x.shape, dtype=torch.float32, device=dev)
            if need_w:
                dw = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
            if need_b:
                dbias = torch.zeros(V, dtype=torch.float32, device=dev)
        dgamma = torch.zeros(V, dtype=torch.float32, device=dev) if gamma is not None else None

        if from_logits or dx is not None or dw is not None or dbias is not None or need_scale:
            launch_bwd(x=x, w=weight, bias=bias, logits=logits, teacher=teacher, sparse=sparse, gamma=gamma,
                       coef=coef, chunks=chunk_table(p.bounds, _chunk_lengths()[1], dev), dx=dx, dw=dw, dbias=dbias,
                       dgamma=dgamma, dlogits=dlogits, B=B, H=0 if from_logits else x.shape[-1], G=G, inv_temp=inv_temp,
                       softmax=softmax, grouped=p.grouped, skip_below=ctx.skip_below)

        def finish(t, like):
            if t is None:
                return None
            if post is not None:
                t = t * post
            return t.to(like.dtype)

        dscale = None
        if need_scale:
            d = dgamma if p.scale_per_class else torch.zeros(G, dtype=torch.float32, device=dev).index_add_(
                0, _segment_ids(p.bounds, dev), dgamma)
            dscale = finish(d, scale)
        return (None, None, finish(dx, x) if need_x else None, finish(dw, weight) if need_w else None,
                finish(dbias, bias) if need_b else None, dlogits if need_logits else None, dscale)


def linear_soft_target_loss(p, *, skip_below: float = 0.0):
    """Backend entry point. ``skip_below`` > 0 lets the backward skip a tile's dx/dW work when every |dL/du| in it is
    below that value (before the mean's 1/B and the upstream gradient); 0, the default, computes every tile."""
    _check_dtype("x", p.x)
    return _SoftTargetFunction.apply(p, skip_below, p.x, p.weight, p.bias, None, p.scale)


def soft_target_loss(p):
    _check_dtype("logits", p.logits)
    return _SoftTargetFunction.apply(p, 0.0, None, None, None, p.logits, p.scale)


# what `auto` may send here (float64 goes to another backend)
linear_soft_target_loss.dtypes = soft_target_loss.dtypes = (torch.float32, torch.float16, torch.bfloat16)
