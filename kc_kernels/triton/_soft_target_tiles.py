"""Pieces of the soft-target epilogue kernels (kc_kernels/triton/epilogue.py): stable sigmoid/softplus without
libdevice (it fails under the interpreter), the sparse targets of a tile from each row's sorted target list, and the
per-element pieces of the soft-cap and of the divergences."""
from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreted() -> bool:
    """Kernels run under TRITON_INTERPRET=1 (CPU tests): one small config, since multi-config autotune fails there."""
    return os.environ.get("TRITON_INTERPRET") == "1"


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


# ---- per-element pieces of the softmax family's options and divergences (the C++ ones: csrc/common/soft_target_math.h)

@triton.jit
def softcap_tanh(x):
    """(tanh(x), 1 - tanh(x)^2) without libdevice, accurate at every |x|: with e = exp(-2|x|), tanh|x| = (1 - e) /
    (1 + e) for |x| >= 0.5, below it the odd Taylor series to x^15 (where 1 - e would cancel); the derivative
    4 e / (1 + e)^2 (1 - tanh^2 itself cancels near saturation)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    inv = 1.0 / (1.0 + e)
    x2 = x * x
    s = -929569.0 / 638512875.0
    s = s * x2 + 21844.0 / 6081075.0
    s = s * x2 - 1382.0 / 155925.0
    s = s * x2 + 62.0 / 2835.0
    s = s * x2 - 17.0 / 315.0
    s = s * x2 + 2.0 / 15.0
    s = s * x2 - 1.0 / 3.0
    th = tl.where(ax < 0.5, s * x2 * ax + ax, (1.0 - e) * inv)
    return tl.where(x < 0, -th, th), 4.0 * e * (inv * inv)


@triton.jit
def log_add_exp(a, b):
    """log(exp(a) + exp(b)) = max(a, b) + log(1 + exp(-|a - b|)); equal infinities give that infinity."""
    d = tl.where(a == b, 0.0, tl.abs(a - b))
    return tl.maximum(a, b) + tl.log(1.0 + tl.exp(-d))


@triton.jit
def weighted_log_ratio(w, d):
    """w * d, and 0 where d <= -100 (w is below e^-100 there): a class at -inf adds 0 (0 log 0), not 0 * -inf.
    A NaN d passes."""
    return w * tl.where(d <= -100.0, 0.0, d)
