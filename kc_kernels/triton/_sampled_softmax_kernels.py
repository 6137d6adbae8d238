"""Triton kernels of sampled softmax.

- ``_sampled_softmax_fwd_kernel``: per block of rows and split of the samples, the sampled logits tile by tile
  (tl.dot over H, sampled weight rows read through ``ids``, no gathered copy) with an online logsumexp; split 0
  also computes the true logits (row-wise dots). Splitting the samples keeps a GPU busy when B is small; the
  host combines the [splits, B] partial logsumexps.
- ``_sampled_softmax_dlogits_kernel``: per (rows, samples) tile, recomputes the logits and writes
  dlogits = scale * softmax (the sampled targets are 0; masked entries give exactly 0).
- ``_sampled_softmax_dx_kernel`` / ``_sampled_softmax_dw_kernel``: dx = dlogits @ W_S (+ the true rows) and
  dW_S = dlogits^T @ x, one output tile per program.

Offsets are int64: ids * H passes 2^31 at 100K classes. Every weight row read through a sampled id or a label is
masked by 0 <= id < V, not only by position: a direct call of the op with ids out of range reads nothing out of
bounds (an id outside is a column of logit -inf, a label outside is padding, as kc_kernels.reference defines).
Masked logits are -inf; the running max starts at a finite floor so that exp(m_old - m_new) never sees -inf - -inf.
Accumulation is in ACC (fp32, or fp64 for fp64 inputs).
"""
from __future__ import annotations

import triton
import triton.language as tl

MAX_FLOOR = tl.constexpr(-1.0e30)  # below any real logit; keeps the online rescale finite before the first valid entry


@triton.jit
def _sampled_logits_tile(x_ptr, w_ptr, bias_ptr, logq_ptr, labels_ptr, last_ptr, rows, row_mask, cols, ids, s_mask,
                         H, T, V, stride_x, stride_w,
                         HAS_BIAS: tl.constexpr, SUBTRACT_LOG_Q: tl.constexpr, REMOVE_HITS: tl.constexpr,
                         LAST_COPY_ONLY: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    """Sampled logits [BLOCK_B, BLOCK_S] in ACC for rows and sampled positions cols (ids = ids[cols]);
    out-of-range columns, ids outside [0, V) and accidental hits are -inf. With LAST_COPY_ONLY (TensorFlow's
    accidental hits) a hit counts only at the positions where last_ptr[col] != 0: the last copy of each id."""
    s_mask = s_mask & (ids >= 0) & (ids < V)
    acc = tl.zeros((BLOCK_B, BLOCK_S), dtype=ACC)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_mask = hs < H
        xt = tl.load(x_ptr + rows[:, None] * stride_x + hs[None, :], mask=row_mask[:, None] & h_mask[None, :],
                     other=0.0)
        wt = tl.load(w_ptr + ids[None, :] * stride_w + hs[:, None], mask=s_mask[None, :] & h_mask[:, None],
                     other=0.0)
        if IEEE:  # fp32 inputs keep fp32 accuracy (no tf32)
            acc = tl.dot(xt, wt, acc=acc, input_precision="ieee", out_dtype=ACC)
        else:
            acc = tl.dot(xt, wt, acc=acc, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ids, mask=s_mask, other=0.0).to(ACC)[None, :]
    if SUBTRACT_LOG_Q:
        acc -= tl.load(logq_ptr + cols, mask=s_mask, other=0.0).to(ACC)[None, :]
    if REMOVE_HITS:
        hit_cols = s_mask
        if LAST_COPY_ONLY:
            hit_cols = hit_cols & (tl.load(last_ptr + cols, mask=s_mask, other=0) != 0)
        for t in range(T):
            lab = tl.load(labels_ptr + rows * T + t, mask=row_mask, other=-1)
            acc = tl.where((lab[:, None] == ids[None, :]) & hit_cols[None, :], float("-inf"), acc)
    return tl.where(s_mask[None, :], acc, float("-inf"))


@triton.jit
def _sampled_softmax_fwd_kernel(x_ptr, w_ptr, bias_ptr, ids_ptr, logq_s_ptr, labels_ptr, last_ptr, logq_t_ptr,
                                lse_part_ptr, picked_ptr, true_logit_ptr, B, S, H, T, V, tiles_per_split,
                                stride_x, stride_w,
                                HAS_BIAS: tl.constexpr, SUBTRACT_LOG_Q: tl.constexpr, REMOVE_HITS: tl.constexpr,
                                LAST_COPY_ONLY: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
                                BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (row block, split): the logsumexp of its share of the sampled tiles -> lse_part[split, rows].
    Split 0 also takes the true logits (stored, and their target-weighted mean -> picked)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    split = tl.program_id(1)  # int32 loop bounds below: S < 2^31
    row_mask = rows < B
    m = tl.full((BLOCK_B,), MAX_FLOOR, dtype=ACC)
    total = tl.zeros((BLOCK_B,), dtype=ACC)

    if split == 0:
        picked = tl.zeros((BLOCK_B,), dtype=ACC)  # sum of the valid true logits
        num_true = tl.zeros((BLOCK_B,), dtype=ACC)
        # true logits: one weight row per (row, label), a row-wise dot
        for t in range(T):
            lab = tl.load(labels_ptr + rows * T + t, mask=row_mask, other=-1)
            valid = (lab >= 0) & (lab < V)
            lab_safe = tl.where(valid, lab, 0)
            dot = tl.zeros((BLOCK_B,), dtype=ACC)
            for h0 in range(0, H, BLOCK_H):
                hs = h0 + tl.arange(0, BLOCK_H)
                mask2 = valid[:, None] & (hs < H)[None, :]
                xt = tl.load(x_ptr + rows[:, None] * stride_x + hs[None, :], mask=mask2, other=0.0).to(ACC)
                wt = tl.load(w_ptr + lab_safe[:, None] * stride_w + hs[None, :], mask=mask2, other=0.0).to(ACC)
                dot += tl.sum(xt * wt, axis=1)
            if HAS_BIAS:
                dot += tl.load(bias_ptr + lab_safe, mask=valid, other=0.0).to(ACC)
            if SUBTRACT_LOG_Q:
                dot -= tl.load(logq_t_ptr + rows * T + t, mask=valid, other=0.0).to(ACC)
            logit = tl.where(valid, dot, float("-inf"))
            tl.store(true_logit_ptr + rows * T + t, logit, mask=row_mask)
            picked += tl.where(valid, dot, 0.0)
            num_true += valid.to(ACC)
            m_new = tl.maximum(m, logit)
            total = total * tl.exp(m - m_new) + tl.exp(logit - m_new)
            m = m_new
        tl.store(picked_ptr + rows, picked / tl.maximum(num_true, 1.0), mask=row_mask)

    # this split's sampled tiles, into the same online logsumexp
    s_begin = split * tiles_per_split * BLOCK_S
    s_end = tl.minimum(s_begin + tiles_per_split * BLOCK_S, S)
    for s0 in range(s_begin, s_end, BLOCK_S):
        cols = (s0 + tl.arange(0, BLOCK_S)).to(tl.int64)
        s_mask = cols < s_end
        ids = tl.load(ids_ptr + cols, mask=s_mask, other=0)
        logits = _sampled_logits_tile(x_ptr, w_ptr, bias_ptr, logq_s_ptr, labels_ptr, last_ptr, rows, row_mask, cols,
                                      ids, s_mask, H, T, V, stride_x, stride_w, HAS_BIAS, SUBTRACT_LOG_Q,
                                      REMOVE_HITS, LAST_COPY_ONLY, IEEE, ACC, BLOCK_B, BLOCK_S, BLOCK_H)
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
    tl.store(lse_part_ptr + split.to(tl.int64) * B + rows, m + tl.log(total), mask=row_mask)


@triton.jit
def _sampled_softmax_dlogits_kernel(x_ptr, w_ptr, bias_ptr, ids_ptr, logq_s_ptr, labels_ptr, last_ptr, lse_ptr,
                                    scale_ptr, dlogits_ptr, B, S, H, T, V, stride_x, stride_w,
                                    HAS_BIAS: tl.constexpr, SUBTRACT_LOG_Q: tl.constexpr,
                                    REMOVE_HITS: tl.constexpr, LAST_COPY_ONLY: tl.constexpr,
                                    IEEE: tl.constexpr, ACC: tl.constexpr,
                                    BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    row_mask, s_mask = rows < B, cols < S
    ids = tl.load(ids_ptr + cols, mask=s_mask, other=0)
    logits = _sampled_logits_tile(x_ptr, w_ptr, bias_ptr, logq_s_ptr, labels_ptr, last_ptr, rows, row_mask, cols, ids,
                                  s_mask, H, T, V, stride_x, stride_w, HAS_BIAS, SUBTRACT_LOG_Q, REMOVE_HITS,
                                  LAST_COPY_ONLY, IEEE, ACC, BLOCK_B, BLOCK_S, BLOCK_H)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    d = tl.exp(logits - lse[:, None]) * scale[:, None]
    tl.store(dlogits_ptr + rows[:, None] * S + cols[None, :], d, mask=row_mask[:, None] & s_mask[None, :])


@triton.jit
def _sampled_softmax_dx_kernel(dlogits_ptr, d_true_ptr, w_ptr, ids_ptr, labels_ptr, dx_ptr, B, S, H, T, V, stride_w,
                               IEEE: tl.constexpr, ACC: tl.constexpr,
                               BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    """dx[rows, hs] = dlogits[rows, :] @ W[ids, hs] + sum_t d_true[rows, t] * W[labels[rows, t], hs]."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    hs = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
    row_mask, h_mask = rows < B, hs < H
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC)
    for s0 in range(0, S, BLOCK_S):
        cols = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        s_mask = cols < S
        ids = tl.load(ids_ptr + cols, mask=s_mask, other=0)
        d = tl.load(dlogits_ptr + rows[:, None] * S + cols[None, :], mask=row_mask[:, None] & s_mask[None, :],
                    other=0.0)
        w_mask = s_mask & (ids >= 0) & (ids < V)
        wt = tl.load(w_ptr + ids[:, None] * stride_w + hs[None, :], mask=w_mask[:, None] & h_mask[None, :],
                     other=0.0).to(ACC)
        if IEEE:
            acc = tl.dot(d, wt, acc=acc, input_precision="ieee", out_dtype=ACC)
        else:  # half inputs: tf32 keeps the fp32 exponent range of dlogits, and the weights have <= 10 bits
            acc = tl.dot(d, wt, acc=acc, out_dtype=ACC)
    for t in range(T):
        lab = tl.load(labels_ptr + rows * T + t, mask=row_mask, other=-1)
        valid = (lab >= 0) & (lab < V)
        dt = tl.load(d_true_ptr + rows * T + t, mask=valid, other=0.0)
        wt = tl.load(w_ptr + tl.where(valid, lab, 0)[:, None] * stride_w + hs[None, :],
                     mask=valid[:, None] & h_mask[None, :], other=0.0).to(ACC)
        acc += dt[:, None] * wt
    tl.store(dx_ptr + rows[:, None] * H + hs[None, :], acc, mask=row_mask[:, None] & h_mask[None, :])


@triton.jit
def _sampled_softmax_dw_kernel(dlogits_ptr, x_ptr, dw_ptr, B, S, H, stride_x,
                               IEEE: tl.constexpr, ACC: tl.constexpr,
                               BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
    """dW_S[cols, hs] = dlogits[:, cols]^T @ x[:, hs] (row cols of the gathered sampled rows)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    hs = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
    s_mask, h_mask = cols < S, hs < H
    acc = tl.zeros((BLOCK_S, BLOCK_H), dtype=ACC)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        row_mask = rows < B
        d_t = tl.load(dlogits_ptr + cols[:, None] + rows[None, :] * S, mask=s_mask[:, None] & row_mask[None, :],
                      other=0.0)  # [BLOCK_S, BLOCK_B]: dlogits transposed by addressing
        xt = tl.load(x_ptr + rows[:, None] * stride_x + hs[None, :], mask=row_mask[:, None] & h_mask[None, :],
                     other=0.0).to(ACC)
        if IEEE:
            acc = tl.dot(d_t, xt, acc=acc, input_precision="ieee", out_dtype=ACC)
        else:
            acc = tl.dot(d_t, xt, acc=acc, out_dtype=ACC)
    tl.store(dw_ptr + cols[:, None] * H + hs[None, :], acc, mask=s_mask[:, None] & h_mask[None, :])
