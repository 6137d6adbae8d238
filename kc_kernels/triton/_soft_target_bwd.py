"""Backward kernel of the soft-target loss: recompute a logits tile, form dL/du in registers, push it to dx and dW.

One program = BLOCK_M rows x one class tile (CCE-style grid over both). Per-(row, segment) coefficients come from
the forward statistics, so dL/du of the dense part is elementwise:
    a = alpha * p - beta * z                   p = sigmoid(y) or exp(y - lse);  z = the target (dense or sparse)
    dL/du = a * gamma / (n T) - u * rc         (self-paced scale; without it dL/du = a / T)
with alpha = c * (1 or T^2 * mass), beta = c * (1 or T^2), rc = c * sum_j (dL/dy_j * y_j) / n^2 and c the row's
weight.

dx += G @ W_tile and dW_tile += G^T @ x are accumulated with fp32 atomics over BLOCK_H slices of the hidden size,
so no [B, V] gradient ever exists. For soft_target_loss (given logits) the tile of dL/du is simply stored.
"""
import torch
import triton
import triton.language as tl

from kc_kernels.triton._soft_target_tiles import interpreted, logits_tile, sigmoid, sparse_cursor, sparse_tile

NCOEF = 6  # alpha, beta, lse, teacher lse, 1 / norm, rc


def _configs():
    if interpreted():
        return [triton.Config(dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, BLOCK_H=32), num_warps=4, num_stages=1)]
    # an sm_90 compile spills least with 8 warps and 64-wide tiles (4 warps spill 1-2 KB); the autotuner decides
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, BLOCK_H=h), num_warps=w, num_stages=s)
            for m, n, k, h, w, s in ((64, 64, 64, 64, 8, 3), (64, 64, 64, 32, 8, 3), (64, 128, 64, 32, 8, 3),
                                     (128, 64, 64, 32, 8, 3))]


# the gradient buffers are accumulated with atomics, so autotuning must zero them before each trial (and before
# the final run)
@triton.autotune(configs=_configs(), key=["H", "SOFTMAX", "DENSE_TEACHER", "HAS_SCALE", "GROUPED", "FROM_LOGITS",
                                           "NEED_DX", "NEED_DW"],
                 reset_to_zero=["dx_ptr", "dw_ptr", "dbias_ptr", "dgamma_ptr"])

@triton.jit
def _soft_target_bwd_kernel(
        x_ptr, w_ptr, bias_ptr, logits_ptr, teacher_ptr, idx_ptr, val_ptr, gamma_ptr, coef_ptr,
        chunk_start_ptr, chunk_end_ptr, chunk_seg_ptr,
        dx_ptr, dw_ptr, dbias_ptr, dgamma_ptr, dlogits_ptr,
        B, H, G, K, plane, num_chunks, stride_xb, stride_xg, stride_lb, stride_tb, inv_temp, skip_below,
        SOFTMAX: tl.constexpr, DENSE_TEACHER: tl.constexpr, SPARSE: tl.constexpr, HAS_SCALE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DBIAS: tl.constexpr, GROUPED: tl.constexpr,
        FROM_LOGITS: tl.constexpr, IEEE: tl.constexpr, SKIP_SMALL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
        GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    # GROUP_M row blocks x every class tile, row block fastest: the programs in flight at once then spread their
    # atomics over a few dx row blocks and a few dW tiles instead of piling onto one (and share x, W tiles in L2)
    num_m = tl.cdiv(B, BLOCK_M)
    in_group = GROUP_M * num_chunks
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    c = (pid % in_group) // group_m
    start = tl.load(chunk_start_ptr + c)
    end = tl.load(chunk_end_ptr + c)
    seg = tl.load(chunk_seg_ptr + c)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    cptr = coef_ptr + rows * G + seg
    alpha = tl.load(cptr, mask=row_mask, other=0.0)
    beta = tl.load(cptr + plane, mask=row_mask, other=0.0)
    if SPARSE:
        cursor = sparse_cursor(idx_ptr, rows, row_mask, K, start, BLOCK_M)
    if SOFTMAX:
        lse = tl.load(cptr + 2 * plane, mask=row_mask, other=0.0)
        if DENSE_TEACHER:
            tlse = tl.load(cptr + 3 * plane, mask=row_mask, other=0.0)
    if HAS_SCALE:
        inv_n = tl.load(cptr + 4 * plane, mask=row_mask, other=1.0)
        rc = tl.load(cptr + 5 * plane, mask=row_mask, other=0.0)

    for c0 in range(start, end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < end
        valid = row_mask[:, None] & col_mask[None, :]
        u = logits_tile(x_ptr, w_ptr, bias_ptr, logits_ptr, rows, cols, row_mask, col_mask, seg, H,
                        stride_xb, stride_xg, stride_lb, HAS_BIAS, GROUPED, FROM_LOGITS, IEEE,
                        BLOCK_M, BLOCK_N, BLOCK_K)
        if HAS_SCALE:
            gam = tl.load(gamma_ptr + cols, mask=col_mask, other=0.0)
            y = u * gam[None, :] * (inv_n * inv_temp)[:, None]
        else:
            y = u * inv_temp
        if SOFTMAX:
            p = tl.exp(tl.minimum(y - lse[:, None], 0.0))  # y <= lse on valid entries; the clamp guards padding
        else:
            p = sigmoid(y)
        a = alpha[:, None] * p
        if DENSE_TEACHER:
            t = tl.load(teacher_ptr + rows[:, None] * stride_tb + cols[None, :], mask=valid,
                        other=0.0).to(tl.float32) * inv_temp
            if SOFTMAX:
                z = tl.exp(tl.minimum(t - tlse[:, None], 0.0))
            else:
                z = sigmoid(t)
            a -= beta[:, None] * z
        if SPARSE:
            z, cursor = sparse_tile(idx_ptr, val_ptr, rows, row_mask, K, cursor, cols,
                                    tl.minimum(c0 + BLOCK_N, end), BLOCK_M, BLOCK_N)
            a -= beta[:, None] * z
        a = tl.where(valid, a, 0.0)
        if HAS_SCALE:
            g = a * gam[None, :] * (inv_n * inv_temp)[:, None] - u * rc[:, None]
            g = tl.where(valid, g, 0.0)
            tl.atomic_add(dgamma_ptr + cols, tl.sum(a * u * (inv_n * inv_temp)[:, None], axis=0), mask=col_mask,
                          sem="relaxed")
        else:
            g = a * inv_temp
        if FROM_LOGITS:
            tl.store(dlogits_ptr + rows[:, None] * stride_lb + cols[None, :],
                     g.to(dlogits_ptr.dtype.element_ty), mask=valid)
        else:
            if NEED_DBIAS:
                tl.atomic_add(dbias_ptr + cols, tl.sum(g, axis=0), mask=col_mask, sem="relaxed")
            if SKIP_SMALL:  # opt-in: a tile whose gradient is all below the threshold adds nothing to dx, dW
                if tl.max(tl.max(tl.abs(g), axis=1), axis=0) >= skip_below:
                    _accumulate_dx_dw(g, x_ptr, w_ptr, dx_ptr, dw_ptr, rows, cols, row_mask, col_mask, seg, H,
                                      stride_xb, stride_xg, NEED_DX, NEED_DW, GROUPED, IEEE, BLOCK_H)
            else:
                _accumulate_dx_dw(g, x_ptr, w_ptr, dx_ptr, dw_ptr, rows, cols, row_mask, col_mask, seg, H,
                                  stride_xb, stride_xg, NEED_DX, NEED_DW, GROUPED, IEEE, BLOCK_H)


@triton.jit
def _accumulate_dx_dw(g, x_ptr, w_ptr, dx_ptr, dw_ptr, rows, cols, row_mask, col_mask, seg, H, stride_xb,
                      stride_xg, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, GROUPED: tl.constexpr,
                      IEEE: tl.constexpr, BLOCK_H: tl.constexpr):
    # the tensor-core operands are in the input dtype; products accumulate in fp32 (the dx/dW buffers are fp32)
    gd = g.to(w_ptr.dtype.element_ty)
    x_off = rows * stride_xb  # dx has x's (contiguous) layout
    if GROUPED:
        x_off += seg * stride_xg
    w_off = cols * H
    # two loops rather than one: fewer tiles live at once (the fused loop spills registers)
    if NEED_DX:
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_mask = hs < H
            wt = tl.load(w_ptr + w_off[:, None] + hs[None, :], mask=col_mask[:, None] & h_mask[None, :], other=0.0)
            if IEEE:
                dx_part = tl.dot(gd, wt, input_precision="ieee")
            else:
                dx_part = tl.dot(gd, wt)
            tl.atomic_add(dx_ptr + x_off[:, None] + hs[None, :], dx_part, mask=row_mask[:, None] & h_mask[None, :],
                          sem="relaxed")  # plain accumulation: no ordering needed
    if NEED_DW:
        gt = tl.trans(gd)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_mask = hs < H
            xt = tl.load(x_ptr + x_off[:, None] + hs[None, :], mask=row_mask[:, None] & h_mask[None, :], other=0.0)
            if IEEE:
                dw_part = tl.dot(gt, xt, input_precision="ieee")
            else:
                dw_part = tl.dot(gt, xt)
            tl.atomic_add(dw_ptr + w_off[:, None] + hs[None, :], dw_part, mask=col_mask[:, None] & h_mask[None, :],
                          sem="relaxed")

def launch_bwd(*, x, w, bias, logits, teacher, sparse, gamma, coef, chunks, dx, dw, dbias, dgamma, dlogits, B, H, G,
               inv_temp, softmax, grouped, skip_below):
    start, end, seg = chunks
    C = start.numel()
    ref = logits if logits is not None else x
    scratch = torch.zeros(1, dtype=torch.float32, device=coef.device)  # stands in for gradients not asked for

    def grid(meta):
        return (triton.cdiv(B, meta["BLOCK_M"]) * C,)

    def ptr(t, fallback=ref):
        return t if t is not None else fallback

    _soft_target_bwd_kernel[grid](
        ptr(x), ptr(w), ptr(bias), ptr(logits), ptr(teacher),
        sparse[0] if sparse is not None else coef, sparse[1] if sparse is not None else coef, ptr(gamma, coef), coef,
        start, end, seg,
        ptr(dx, scratch), ptr(dw, scratch), ptr(dbias, scratch), ptr(dgamma, scratch), ptr(dlogits),
        B, H, G, sparse[0].shape[1] if sparse is not None else 0, B * G, C,
        x.stride(0) if x is not None else 0, (x.stride(1) if grouped else 0) if x is not None else 0,
        logits.stride(0) if logits is not None else 0, teacher.stride(0) if teacher is not None else 0,
        inv_temp, float(skip_below),
        SOFTMAX=softmax, DENSE_TEACHER=teacher is not None, SPARSE=sparse is not None, HAS_SCALE=gamma is not None,
        HAS_BIAS=bias is not None,
        NEED_DX=dx is not None, NEED_DW=dw is not None, NEED_DBIAS=dbias is not None, GROUPED=grouped,
        FROM_LOGITS=logits is not None, IEEE=ref.dtype == torch.float32, SKIP_SMALL=skip_below > 0,
        GROUP_M=2 if interpreted() else 8)
