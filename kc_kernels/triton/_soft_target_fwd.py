"""Forward kernel of the soft-target loss: per (row, chunk) statistics, reduced online over the chunk's class tiles.

One program = BLOCK_M rows x one chunk (a class range inside one segment). It recomputes the logits tile by tile
with tl.dot and keeps running reductions in registers, then writes a handful of fp32 numbers per row to
stats [NSTAT, B, C]; the host merges chunks of the same segment (the same online-logsumexp merge, done once).

Passes:
- NORM_PASS (self-paced scale only): stats[0] = sum of u^2 (the segment's L2 norm is needed before any y exists).
- sigmoid: stats = (sum softplus(y), sum sigmoid(y) * y, sum z * y).
- softmax: stats = (max y, sum exp(y - max), sum exp(y - max) * y,
                    max t, sum exp(t - max t), sum exp(t - max t) * y)   with t = teacher_logits / T;
  with sparse targets the last one is sum z * y.
The sigmoid(y) * y and exp(y - max) * y sums (only computed under the scale) feed the scale's gradient, which needs
sum_j dL/dy_j * y_j per segment, without another pass.
"""
import torch
import triton
import triton.language as tl

from kc_kernels.triton._soft_target_tiles import (interpreted, logits_tile, sigmoid, softplus_and_sigmoid,
                                                 sparse_cursor, sparse_tile)

NSTAT = 6


def _configs():
    if interpreted():
        return [triton.Config(dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32), num_warps=4, num_stages=1)]
    # 128x128 tiles reach the 255-register limit once the softmax/teacher temporaries are live (sm_90 compile),
    # hence the smaller candidates; configs that do not fit are skipped by the autotuner
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
            for m, n, k, w, s in ((64, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3),
                                  (128, 128, 64, 8, 3), (64, 64, 32, 4, 3))]


@triton.autotune(configs=_configs(), key=["H", "NORM_PASS", "SOFTMAX", "DENSE_TEACHER", "HAS_SCALE", "GROUPED",
                                           "FROM_LOGITS"])
@triton.jit
def _soft_target_fwd_kernel(
        x_ptr, w_ptr, bias_ptr, logits_ptr, teacher_ptr, idx_ptr, val_ptr, gamma_ptr, inv_norm_ptr,
        chunk_start_ptr, chunk_end_ptr, chunk_seg_ptr, stats_ptr,
        B, H, G, C, K, plane, stride_xb, stride_xg, stride_lb, stride_tb, inv_temp,
        NORM_PASS: tl.constexpr, SOFTMAX: tl.constexpr, DENSE_TEACHER: tl.constexpr, SPARSE: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, FROM_LOGITS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(B, BLOCK_M)
    pid_m = pid % num_m  # row blocks vary fastest: neighbouring programs share the chunk's weight rows in L2
    c = pid // num_m
    start = tl.load(chunk_start_ptr + c)
    end = tl.load(chunk_end_ptr + c)
    seg = tl.load(chunk_seg_ptr + c)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    if HAS_SCALE and not NORM_PASS:
        inv_n = tl.load(inv_norm_ptr + rows * G + seg, mask=row_mask, other=1.0)

    neg_inf = float("-inf")
    acc0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc4 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc5 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if SOFTMAX and not NORM_PASS:
        acc0 = tl.full((BLOCK_M,), neg_inf, dtype=tl.float32)  # running max of y
        acc3 = tl.full((BLOCK_M,), neg_inf, dtype=tl.float32)  # running max of t
    if SPARSE and not NORM_PASS:
        cursor = sparse_cursor(idx_ptr, rows, row_mask, K, start, BLOCK_M)

    for c0 in range(start, end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < end
        u = logits_tile(x_ptr, w_ptr, bias_ptr, logits_ptr, rows, cols, row_mask, col_mask, seg, H,
                        stride_xb, stride_xg, stride_lb, HAS_BIAS, GROUPED, FROM_LOGITS, IEEE,
                        BLOCK_M, BLOCK_N, BLOCK_K)
        valid = row_mask[:, None] & col_mask[None, :]
        if NORM_PASS:
            acc0 += tl.sum(tl.where(valid, u * u, 0.0), axis=1)
        else:
            if HAS_SCALE:
                gam = tl.load(gamma_ptr + cols, mask=col_mask, other=0.0)
                y = u * gam[None, :] * (inv_n * inv_temp)[:, None]
            else:
                y = u * inv_temp
            y = tl.where(valid, y, 0.0)
            if DENSE_TEACHER:
                t = tl.load(teacher_ptr + rows[:, None] * stride_tb + cols[None, :], mask=valid,
                            other=0.0).to(tl.float32) * inv_temp
            if SPARSE:
                z, cursor = sparse_tile(idx_ptr, val_ptr, rows, row_mask, K, cursor, cols,
                                        tl.minimum(c0 + BLOCK_N, end), BLOCK_M, BLOCK_N)
            if SOFTMAX:
                ym = tl.where(col_mask[None, :], y, neg_inf)
                m_new = tl.maximum(acc0, tl.max(ym, axis=1))  # finite: every tile has a valid column
                rescale = tl.exp(acc0 - m_new)
                e = tl.exp(ym - m_new[:, None])
                acc1 = acc1 * rescale + tl.sum(e, axis=1)
                if HAS_SCALE:  # only the scale's gradient needs sum softmax * y
                    acc2 = acc2 * rescale + tl.sum(e * y, axis=1)
                acc0 = m_new
                if DENSE_TEACHER:
                    tm = tl.where(col_mask[None, :], t, neg_inf)
                    tm_new = tl.maximum(acc3, tl.max(tm, axis=1))
                    # a tile of -inf teacher logits must not turn into exp(-inf - -inf) = NaN
                    tm_safe = tl.where(tm_new == neg_inf, 0.0, tm_new)
                    trescale = tl.exp(acc3 - tm_safe)
                    et = tl.exp(tm - tm_safe[:, None])
                    acc4 = acc4 * trescale + tl.sum(et, axis=1)
                    acc5 = acc5 * trescale + tl.sum(et * y, axis=1)
                    acc3 = tm_new
                if SPARSE:
                    acc5 += tl.sum(z * y, axis=1)
            else:
                sp, sg = softplus_and_sigmoid(y)
                acc0 += tl.sum(tl.where(valid, sp, 0.0), axis=1)
                if HAS_SCALE:  # only the scale's gradient needs sum sigmoid * y
                    acc1 += tl.sum(sg * y, axis=1)
                if DENSE_TEACHER:
                    acc2 += tl.sum(tl.where(valid, sigmoid(t), 0.0) * y, axis=1)
                if SPARSE:
                    acc2 += tl.sum(z * y, axis=1)

    out = stats_ptr + rows * C + c
    tl.store(out, acc0, mask=row_mask)
    if not NORM_PASS:
        tl.store(out + plane, acc1, mask=row_mask)
        tl.store(out + 2 * plane, acc2, mask=row_mask)
        if SOFTMAX:
            tl.store(out + 3 * plane, acc3, mask=row_mask)
            tl.store(out + 4 * plane, acc4, mask=row_mask)
            tl.store(out + 5 * plane, acc5, mask=row_mask)


def launch_fwd(*, x, w, bias, logits, teacher, sparse, gamma, inv_norm, chunks, stats, B, H, G, inv_temp,
               norm_pass, softmax, grouped):
    """sparse: None or (sorted target classes int32 [B, K], their values fp32 [B, K])."""
    start, end, seg = chunks
    C = start.numel()
    ref = logits if logits is not None else x
    dummy = ref  # unused pointer arguments still need a tensor

    def grid(meta):
        return (triton.cdiv(B, meta["BLOCK_M"]) * C,)

    _soft_target_fwd_kernel[grid](
        x if x is not None else dummy, w if w is not None else dummy, bias if bias is not None else dummy,
        logits if logits is not None else dummy, teacher if teacher is not None else dummy,
        sparse[0] if sparse is not None else stats, sparse[1] if sparse is not None else stats,
        gamma if gamma is not None else stats, inv_norm if inv_norm is not None else stats,
        start, end, seg, stats,
        B, H, G, C, sparse[0].shape[1] if sparse is not None else 0,
        B * C,  # plane size from the host: an int64 argument once it passes 2^31
        x.stride(0) if x is not None else 0, (x.stride(1) if grouped else 0) if x is not None else 0,
        logits.stride(0) if logits is not None else 0, teacher.stride(0) if teacher is not None else 0,
        inv_temp,
        NORM_PASS=norm_pass, SOFTMAX=softmax, DENSE_TEACHER=teacher is not None,
        SPARSE=sparse is not None, HAS_SCALE=gamma is not None,
        HAS_BIAS=bias is not None, GROUPED=grouped, FROM_LOGITS=logits is not None, IEEE=ref.dtype == torch.float32)

