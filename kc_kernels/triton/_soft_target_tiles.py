"""Pieces shared by the soft-target forward and backward kernels: the logits tile and the class-chunk table.

Every program works on BLOCK_M rows and on one *chunk*: a class range that lies inside a single segment (so the
segment, its scale and, for grouped x, the hidden vector x[:, g, :] are one scalar per program). Chunks are built
on the host from the segment offsets; a segment longer than the chunk length is split into several chunks.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import torch
import triton
import triton.language as tl


def interpreted() -> bool:
    """Kernels run under TRITON_INTERPRET=1 (CPU tests): one small config, since multi-config autotune fails there."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def chunk_table(bounds: List[int], chunk: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(start [C], end [C], segment [C]) int64: every segment cut into pieces of at most ``chunk`` classes."""
    b = torch.tensor(bounds, dtype=torch.int64)
    sizes = b[1:] - b[:-1]
    pieces = (sizes + chunk - 1) // chunk
    seg = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int64), pieces)
    first = torch.cumsum(pieces, 0) - pieces  # index of each segment's first chunk
    within = torch.arange(len(seg), dtype=torch.int64) - first[seg]
    start = b[:-1][seg] + within * chunk
    end = torch.minimum(start + chunk, b[1:][seg])
    return start.to(device), end.to(device), seg.to(device)


@triton.jit
def logits_tile(x_ptr, w_ptr, bias_ptr, logits_ptr, rows, cols, row_mask, col_mask, seg, H,
                stride_xb, stride_xg, stride_lb,
                HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, FROM_LOGITS: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Raw logits u [BLOCK_M, BLOCK_N] in fp32; rows and cols are int64 (B*V and V*H pass 2^31 at 100K classes)."""
    if FROM_LOGITS:
        u = tl.load(logits_ptr + rows[:, None] * stride_lb + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    else:
        x_rows = x_ptr + rows * stride_xb
        if GROUPED:
            x_rows += seg * stride_xg
        w_rows = w_ptr + cols * H
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < H
            xt = tl.load(x_rows[:, None] + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            wt = tl.load(w_rows[:, None] + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            if IEEE:  # fp32 inputs keep fp32 accuracy (no tf32)
                acc = tl.dot(xt, tl.trans(wt), acc=acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, tl.trans(wt), acc=acc)
        u = acc
        if HAS_BIAS:
            u += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return u


@triton.jit
def softplus_and_sigmoid(y):
    """softplus(y) and sigmoid(y) from one exp, stable for any sign of y (no libdevice: it fails when interpreted)."""
    e = tl.exp(-tl.abs(y))
    softplus = tl.maximum(y, 0.0) + tl.log(1.0 + e)
    inv = 1.0 / (1.0 + e)
    sigmoid = tl.where(y >= 0, inv, e * inv)
    return softplus, sigmoid


@triton.jit
def sigmoid(v):
    e = tl.exp(-tl.abs(v))
    inv = 1.0 / (1.0 + e)
    return tl.where(v >= 0, inv, e * inv)


# Sparse targets, fused: every row's targets are sorted by class on the host (padding becomes class V, past every
# tile). A program finds, per row, the first target at or after its first class (a vectorised binary search), then
# walks the rows' targets tile by tile with that cursor. A 100K-class row with K=100 targets has about one target
# per thousand classes, so a tile costs one or two masked passes, not K.

@triton.jit
def sparse_cursor(idx_ptr, rows, row_mask, K, first_class, BLOCK_M: tl.constexpr):
    """Per row, the position in its sorted targets of the first class >= first_class (int32 [BLOCK_M])."""
    base = idx_ptr + rows * K
    lo = tl.zeros((BLOCK_M,), dtype=tl.int32)
    hi = tl.where(row_mask, tl.zeros((BLOCK_M,), dtype=tl.int32) + K, 0)
    active = lo < hi
    while tl.max(active.to(tl.int32), axis=0) > 0:  # about log2(K) rounds
        mid = (lo + hi) // 2
        v = tl.load(base + mid, mask=active, other=0)
        lo = tl.where(active & (v < first_class), mid + 1, lo)
        hi = tl.where(active & (v >= first_class), mid, hi)
        active = lo < hi
    return lo


@triton.jit
def sparse_tile(idx_ptr, val_ptr, rows, row_mask, K, cursor, cols, end_class,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dense [BLOCK_M, BLOCK_N] tile of the sparse targets with class < end_class from the cursor on (duplicates add
    up), and the advanced cursor."""
    base = idx_ptr + rows * K
    z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    nxt = tl.load(base + cursor, mask=row_mask & (cursor < K), other=end_class)
    more = row_mask & (cursor < K) & (nxt < end_class)
    while tl.max(more.to(tl.int32), axis=0) > 0:
        v = tl.load(val_ptr + rows * K + cursor, mask=more, other=0.0)
        z += tl.where((cols[None, :] == nxt[:, None]) & more[:, None], v[:, None], 0.0)
        cursor = tl.where(more, cursor + 1, cursor)
        nxt = tl.load(base + cursor, mask=row_mask & (cursor < K), other=end_class)
        more = row_mask & (cursor < K) & (nxt < end_class)
    return z, cursor
