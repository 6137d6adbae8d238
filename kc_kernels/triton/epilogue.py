"""Triton epilogue of the chunked driver (contract and math: docs/epilogue.md).

Kernels per chunk of raw scores u = S (the driver's GEMM output, no bias):

- ``row_stats``: one program per (row, segment piece) walks the piece's columns and folds them into
  ``states[:, row, piece_seg]``: the dense teacher's log-sum-exp and entropy sum (TEACHER), the squared norm (NORM),
  and the target and softmax/sigmoid sums that need the norm and the teacher's log-sum-exp (STATS; the reverse KL's
  DIV too). A chunk holds a segment at most once, so every program owns its states: no atomics, bitwise
  reproducible.
- ``mix`` (JSD): the same programs, once STATS and TEACHER are complete for the segments: the sums over the mixture
  M = beta z + (1 - beta) p (DLOSS, DIV), given the log-sums-exp in ``consts``.
- ``final``: one program per [BLOCK_R, BLOCK_C] tile, elementwise given the per-(row, segment) ``consts``: the
  loss's row sums per column tile, and with ``coef`` the logit gradient written over S in place plus the bias and
  per-class scale gradients as column sums per row tile (merged by the driver, again without atomics).

KL runs as SOFTMAX (the same statistics and gradient). The options of SOFTMAX/KL without a scale (the soft-cap
c > 0: y = c tanh((u + bias) / c) / T; a uniform target e added to every class's target) are constexpr branches,
so the option-free kernels are unchanged. Everything is computed in fp32 whatever the dtypes of S and of the
teacher. Row offsets are int64: rows * stride passes 2^31 at 100K classes. No kernel is autotuned: each updates
its outputs in place (S, the states), so a benchmarking run would corrupt them; the tile is fixed anyway since it
sizes the driver's partial buffers.
"""
from __future__ import annotations

import sys

import triton
import triton.language as tl

from kc_kernels.gpu_epilogue import DeviceEpilogue
from kc_kernels.layout import NORM_EPS, Const, Phase, State
from kc_kernels.loss_modes import LossMode
from kc_kernels.triton._soft_target_tiles import interpreted, sigmoid, softcap_tanh, sparse_cursor, sparse_tile
from kc_kernels.triton.loss_modes import JSD as _JSD
from kc_kernels.triton.loss_modes import REVERSE_KL as _REVERSE_KL
from kc_kernels.triton.loss_modes import SIGMOID as _SIGMOID
from kc_kernels.triton.loss_modes import SOFTMAX as _SOFTMAX
from kc_kernels.triton.loss_modes import dense_target, jsd_element, jsd_q, loss_and_q, reverse_kl_q

__all__ = ["TILE", "row_stats", "mix", "final", "EPILOGUE"]

# One config each (see above). TILE = (BLOCK_R, BLOCK_C) of final: the driver sizes row_part and col_part with it.
# On the GPU 8 elements a thread (32 x 128 at 16 warps) keep the final tile's ~10 live fp32 values under 128 registers
# without spilling (sm_90; 32 x 256 at 8 warps spills). Interpreted (CPU tests) the tile is larger, as the interpreter
# pays per program, and a row_stats step is short, so that the tests' small pieces span several steps and the online
# merges are exercised.
if interpreted():
    TILE = (32, 256)
    _FINAL_WARPS = 4
    _MIN_ROW_BLOCK = _MAX_ROW_BLOCK = 128
    _TARGET_BLOCK = 8
else:
    TILE = (32, 128)
    _FINAL_WARPS = 16
    _MIN_ROW_BLOCK, _MAX_ROW_BLOCK = 128, 1024  # columns per step of a row_stats program
    _TARGET_BLOCK = 32  # sparse targets per step of a row_stats program

# State planes and consts planes as compile-time constants (jit functions read only constexpr globals), from the
# IntEnums of kc_kernels/layout.py.
_SUMSQ, _MAX, _SUMEXP = (tl.constexpr(int(State.SUMSQ)), tl.constexpr(int(State.MAX)),
                         tl.constexpr(int(State.SUMEXP)))
_SUMEXP_U, _SUMEXP_Y = tl.constexpr(int(State.SUMEXP_U)), tl.constexpr(int(State.SUMEXP_Y))
_ZSUM, _ZY = tl.constexpr(int(State.ZSUM)), tl.constexpr(int(State.ZY))
_ZU, _ZYH = tl.constexpr(int(State.ZU)), tl.constexpr(int(State.ZYH))
_TMAX, _TSUMEXP = tl.constexpr(int(State.TMAX)), tl.constexpr(int(State.TSUMEXP))
_TENT, _DIV, _DLOSS = tl.constexpr(int(State.TENT)), tl.constexpr(int(State.DIV)), tl.constexpr(int(State.DLOSS))
_INV_NT, _LSE, _MASS = tl.constexpr(int(Const.INV_NT)), tl.constexpr(int(Const.LSE)), tl.constexpr(int(Const.MASS))
_TLSE, _S_N2, _DBAR = tl.constexpr(int(Const.TLSE)), tl.constexpr(int(Const.S_N2)), tl.constexpr(int(Const.DBAR))
_EPS = tl.constexpr(NORM_EPS)


# ---------------------------------------------------------------------------------------------------- helpers

@triton.jit
def _merge_factors(old_max, new_max):
    """(merged, exp(old_max - merged), exp(new_max - merged)) of an online log-sum-exp merge. A side still at -inf
    (nothing seen yet, or only ruled-out classes) gets factor 0, never exp(-inf - -inf) = NaN: its sums are 0."""
    merged = tl.maximum(old_max, new_max)
    finite = tl.where(merged == float("-inf"), 0.0, merged)
    return merged, tl.exp(old_max - finite), tl.exp(new_max - finite)


@triton.jit
def _first_target_at_least(idx_row, K, cls):
    """Position of the first of the row's sorted targets with class >= cls (K if none): binary search."""
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + K
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(idx_row + mid) < cls
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _scaled_logits(u, inv_nt, inv_t, scale_ptr, bias_ptr, cls, mask, softcap, inv_softcap, HAS_SCALE: tl.constexpr,
                   HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """(u/(nT), yh = s u/(nT), y = yh + bias/T) of classes ``cls``: the bias is a prior outside the norm. With the
    soft-cap (no scale) y = c tanh((u + bias) / c) / T."""
    up = u * inv_nt
    if HAS_SCALE:
        yh = up * tl.load(scale_ptr + cls, mask=mask, other=0.0)
    else:
        yh = up
    if SOFTCAP:
        if HAS_BIAS:
            v = u + tl.load(bias_ptr + cls, mask=mask, other=0.0)
        else:
            v = u
        th, _ = softcap_tanh(v * inv_softcap)
        y = softcap * th * inv_t
    elif HAS_BIAS:
        y = yh + tl.load(bias_ptr + cls, mask=mask, other=0.0) * inv_t
    else:
        y = yh
    return up, yh, y


# ---------------------------------------------------------------------------------------------------- row_stats

@triton.jit
def _teacher_lse_piece(t_row, lo, hi, inv_t, BLOCK: tl.constexpr):
    """(max, sum e, sum e t/T) with e = exp(t/T - max) of the dense teacher over local columns [lo, hi), online
    over blocks (the last is the teacher's entropy sum, TENT)."""
    run_max = tl.full([], float("-inf"), tl.float32)
    run_sum = tl.full([], 0.0, tl.float32)
    run_ent = tl.full([], 0.0, tl.float32)
    for c in range(lo, hi, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        mask = cols < hi
        t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
        t = tl.where(mask, t, float("-inf"))
        run_max, f_old, _ = _merge_factors(run_max, tl.max(t, axis=0))
        # relative to the merged max already; while every logit so far is -inf (a masked-out class), sum 0, not NaN
        finite_max = tl.where(run_max == float("-inf"), 0.0, run_max)
        e = tl.where(mask, tl.exp(t - finite_max), 0.0)
        run_sum = run_sum * f_old + tl.sum(e, axis=0)
        run_ent = run_ent * f_old + tl.sum(e * tl.where(e > 0, t, 0.0), axis=0)  # a class at -inf adds 0
    return run_max, run_sum, run_ent


@triton.jit
def _sumsq_piece(u_row, lo, hi, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(lo, hi, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        u = tl.load(u_row + cols, mask=cols < hi, other=0.0).to(tl.float32)
        acc += u * u
    return tl.sum(acc, axis=0)


@triton.jit
def _sparse_target_sums(u_row, idx_row, val_row, K, scale_ptr, bias_ptr, col0, lo, hi, inv_nt, inv_t, softcap,
                        inv_softcap, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                        BLOCK_T: tl.constexpr):
    """(sum z, sum z y, sum z u/(nT), sum z yh) over the row's sparse targets in the piece's classes
    [col0 + lo, col0 + hi). The row is sorted by class, so they are one run of positions; duplicates add up."""
    first = _first_target_at_least(idx_row, K, col0 + lo)
    end = _first_target_at_least(idx_row, K, col0 + hi)
    zsum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_T,), dtype=tl.float32)
    zu = tl.zeros((BLOCK_T,), dtype=tl.float32)
    zyh = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k in range(first, end, BLOCK_T):
        pos = k + tl.arange(0, BLOCK_T)
        mask = pos < end
        cls = tl.load(idx_row + pos, mask=mask, other=0)
        v = tl.load(val_row + pos, mask=mask, other=0.0)
        u = tl.load(u_row + (cls - col0), mask=mask, other=0.0).to(tl.float32)
        up, yh, y = _scaled_logits(u, inv_nt, inv_t, scale_ptr, bias_ptr, cls, mask, softcap, inv_softcap,
                                   HAS_SCALE, HAS_BIAS, SOFTCAP)
        zsum += v
        zy += v * y
        zu += v * up
        zyh += v * yh
    return tl.sum(zsum, axis=0), tl.sum(zy, axis=0), tl.sum(zu, axis=0), tl.sum(zyh, axis=0)


@triton.jit
def _piece_column_sums(u_row, t_row, scale_ptr, bias_ptr, col0, lo, hi, inv_nt, inv_t, tlse, softcap, inv_softcap,
                       MODE: tl.constexpr, DENSE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       SOFTCAP: tl.constexpr, UNIFORM: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over local columns [lo, hi) (u is read once for everything):
    softmax family: (max y, sum e, sum e u/(nT), sum e yh) with e = exp(y - max y), merged online over the blocks;
    sigmoid: (unused, unused, sum sigmoid(y) u/(nT), sum sigmoid(y) yh);
    then, for a dense teacher of sigmoid or softmax, (sum z, sum z y, sum z u/(nT), sum z yh);
    the reverse KL's sum e (y - t/T) (merged as sum e); with a uniform target, sum y."""
    run_max = tl.full([], float("-inf"), tl.float32)
    se = tl.full([], 0.0, tl.float32)
    seu = tl.full([], 0.0, tl.float32)
    sey = tl.full([], 0.0, tl.float32)
    sdiv = tl.full([], 0.0, tl.float32)
    ysum = tl.zeros((BLOCK,), dtype=tl.float32)
    sig_u = tl.zeros((BLOCK,), dtype=tl.float32)
    sig_y = tl.zeros((BLOCK,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK,), dtype=tl.float32)
    zy = tl.zeros((BLOCK,), dtype=tl.float32)
    zu = tl.zeros((BLOCK,), dtype=tl.float32)
    zyh = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(lo, hi, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        mask = cols < hi
        u = tl.load(u_row + cols, mask=mask, other=0.0).to(tl.float32)
        up, yh, y = _scaled_logits(u, inv_nt, inv_t, scale_ptr, bias_ptr, col0 + cols, mask, softcap, inv_softcap,
                                   HAS_SCALE, HAS_BIAS, SOFTCAP)
        if MODE != _SIGMOID:
            run_max, f_old, _ = _merge_factors(run_max, tl.max(tl.where(mask, y, float("-inf")), axis=0))
            e = tl.where(mask, tl.exp(y - run_max), 0.0)  # already relative to the merged max
            se = se * f_old + tl.sum(e, axis=0)
            seu = seu * f_old + tl.sum(e * up, axis=0)
            sey = sey * f_old + tl.sum(e * yh, axis=0)
            if MODE == _REVERSE_KL:
                t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
                sdiv = sdiv * f_old + tl.sum(e * tl.where(e > 0, y - t, 0.0), axis=0)
        else:
            sg = tl.where(mask, sigmoid(y), 0.0)
            sig_u += sg * up
            sig_y += sg * yh
        if UNIFORM:
            ysum += tl.where(mask, y, 0.0)
        if DENSE and (MODE == _SOFTMAX or MODE == _SIGMOID):
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
            z = tl.where(mask, dense_target(t, tlse, MODE), 0.0)
            zsum += z
            zy += z * y
            zu += z * up
            zyh += z * yh
    if MODE == _SIGMOID:
        seu = tl.sum(sig_u, axis=0)
        sey = tl.sum(sig_y, axis=0)
    return (run_max, se, seu, sey,
            tl.sum(zsum, axis=0), tl.sum(zy, axis=0), tl.sum(zu, axis=0), tl.sum(zyh, axis=0),
            sdiv, tl.sum(ysum, axis=0))


@triton.jit
def _add_target_states(state, st_plane, zsum, zy, zu, zyh):
    """ZSUM, ZY, ZU, ZYH += the piece's target sums."""
    p = state + _ZSUM * st_plane
    tl.store(p, tl.load(p) + zsum)
    p = state + _ZY * st_plane
    tl.store(p, tl.load(p) + zy)
    p = state + _ZU * st_plane
    tl.store(p, tl.load(p) + zu)
    p = state + _ZYH * st_plane
    tl.store(p, tl.load(p) + zyh)


@triton.jit
def _merge_softmax_states(state, st_plane, m, se, seu, sey, sdiv, STATS_DIV: tl.constexpr):
    """Online merge of one piece's (max, sums) into MAX, SUMEXP, SUMEXP_U, SUMEXP_Y (and DIV: the reverse KL)."""
    p_max = state + _MAX * st_plane
    merged, f_old, f_new = _merge_factors(tl.load(p_max), m)
    p = state + _SUMEXP * st_plane
    tl.store(p, tl.load(p) * f_old + se * f_new)
    p = state + _SUMEXP_U * st_plane
    tl.store(p, tl.load(p) * f_old + seu * f_new)
    p = state + _SUMEXP_Y * st_plane
    tl.store(p, tl.load(p) * f_old + sey * f_new)
    if STATS_DIV:
        p = state + _DIV * st_plane
        tl.store(p, tl.load(p) * f_old + sdiv * f_new)
    tl.store(p_max, merged)


@triton.jit
def _row_stats_kernel(
        S_ptr, teacher_ptr, idx_ptr, val_ptr, scale_ptr, bias_ptr, piece_lo_ptr, piece_seg_ptr, states_ptr,
        col0, tcol0, K, stride_s, stride_t, st_plane, st_row, st_seg, inv_t, softcap, inv_softcap, uniform,
        TEACHER: tl.constexpr, NORM: tl.constexpr, STATS: tl.constexpr,
        MODE: tl.constexpr, DENSE: tl.constexpr, SPARSE: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UNIFORM: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1)
    st_plane = tl.full([], 0, tl.int64) + st_plane  # 12 planes of rows * G states may pass 2^31
    lo = tl.load(piece_lo_ptr + piece)
    hi = tl.load(piece_lo_ptr + piece + 1)
    seg = tl.load(piece_seg_ptr + piece).to(tl.int64)
    state = states_ptr + row * st_row + seg * st_seg
    u_row = S_ptr + row * stride_s
    t_row = teacher_ptr + row * stride_t + tcol0  # local column j of the chunk is the teacher's column tcol0 + j

    # Values produced in this call are carried in registers, not re-read from memory: on a GPU a store by one
    # thread is not guaranteed visible to the others of the program without a barrier.
    if TEACHER:
        p_tmax = state + _TMAX * st_plane
        p_tsum = state + _TSUMEXP * st_plane
        p_tent = state + _TENT * st_plane
        m, s, ent = _teacher_lse_piece(t_row, lo, hi, inv_t, BLOCK)
        tmax, f_old, f_new = _merge_factors(tl.load(p_tmax), m)
        tsum = tl.load(p_tsum) * f_old + s * f_new
        tl.store(p_tmax, tmax)
        tl.store(p_tsum, tsum)
        tl.store(p_tent, tl.load(p_tent) * f_old + ent * f_new)
    elif STATS and MODE == _SOFTMAX and DENSE:
        tmax = tl.load(state + _TMAX * st_plane)
        tsum = tl.load(state + _TSUMEXP * st_plane)

    if NORM:
        p_sumsq = state + _SUMSQ * st_plane
        sumsq = tl.load(p_sumsq) + _sumsq_piece(u_row, lo, hi, BLOCK)
        tl.store(p_sumsq, sumsq)
    elif STATS and HAS_SCALE:
        sumsq = tl.load(state + _SUMSQ * st_plane)

    if STATS:
        if HAS_SCALE:
            inv_nt = inv_t / tl.sqrt(sumsq + _EPS)
        else:
            inv_nt = tl.full([], 0.0, tl.float32) + inv_t
        if MODE == _SOFTMAX and DENSE:
            tlse = tmax + tl.log(tsum)
        else:
            tlse = tl.full([], 0.0, tl.float32)
        m, se, seu, sey, zsum, zy, zu, zyh, sdiv, ysum = _piece_column_sums(
            u_row, t_row, scale_ptr, bias_ptr, col0, lo, hi, inv_nt, inv_t, tlse, softcap, inv_softcap, MODE, DENSE,
            HAS_SCALE, HAS_BIAS, SOFTCAP, UNIFORM, BLOCK)
        if SPARSE:
            zsum, zy, zu, zyh = _sparse_target_sums(u_row, idx_ptr + row * K, val_ptr + row * K, K, scale_ptr,
                                                    bias_ptr, col0, lo, hi, inv_nt, inv_t, softcap, inv_softcap,
                                                    HAS_SCALE, HAS_BIAS, SOFTCAP, BLOCK_T)
        if UNIFORM:  # e added to every class's target (no scale: ZU and ZYH are not read)
            zsum += uniform * (hi - lo).to(tl.float32)
            zy += uniform * ysum
        if (DENSE or SPARSE or UNIFORM) and (MODE == _SOFTMAX or MODE == _SIGMOID):
            # neither: no targets at all (K == 0), every z sum stays 0; the divergences keep none
            _add_target_states(state, st_plane, zsum, zy, zu, zyh)
        if MODE != _SIGMOID:
            _merge_softmax_states(state, st_plane, m, se, seu, sey, sdiv, MODE == _REVERSE_KL)
        else:
            p = state + _SUMEXP_U * st_plane
            tl.store(p, tl.load(p) + seu)
            p = state + _SUMEXP_Y * st_plane
            tl.store(p, tl.load(p) + sey)


# ---------------------------------------------------------------------------------------------------- mix

@triton.jit
def _mix_kernel(
        S_ptr, teacher_ptr, bias_ptr, piece_lo_ptr, piece_seg_ptr, states_ptr, consts_ptr,
        col0, tcol0, G, stride_s, stride_t, st_plane, st_row, st_seg, plane, inv_t, beta,
        HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """JSD: DLOSS += sum beta z (lz - lm) + (1 - beta) p (lp - lm) and DIV += sum p (lp - lm) over the piece,
    lm = log(beta z + (1 - beta) p), given the segment's LSE and TLSE in ``consts`` (complete statistics)."""
    row = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1)
    st_plane = tl.full([], 0, tl.int64) + st_plane
    plane = tl.full([], 0, tl.int64) + plane
    lo = tl.load(piece_lo_ptr + piece)
    hi = tl.load(piece_lo_ptr + piece + 1)
    seg = tl.load(piece_seg_ptr + piece).to(tl.int64)
    state = states_ptr + row * st_row + seg * st_seg
    cst = consts_ptr + row * G + seg
    lse = tl.load(cst + _LSE * plane)
    tlse = tl.load(cst + _TLSE * plane)
    log_beta = tl.log(beta)
    log_1mbeta = tl.log(1.0 - beta)
    u_row = S_ptr + row * stride_s
    t_row = teacher_ptr + row * stride_t + tcol0
    acc_loss = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_div = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(lo, hi, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        mask = cols < hi
        u = tl.load(u_row + cols, mask=mask, other=0.0).to(tl.float32)
        # y as STATS computes it (no scale, no soft-cap in the divergences: 1/(nT) is 1/T)
        _, _, y = _scaled_logits(u, inv_t, inv_t, bias_ptr, bias_ptr, col0 + cols, mask, 0.0, 0.0, False, HAS_BIAS,
                                 False)
        t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
        loss, div, _, _ = jsd_element(t - tlse, y - lse, beta, log_beta, log_1mbeta)
        acc_loss += tl.where(mask, loss, 0.0)
        acc_div += tl.where(mask, div, 0.0)
    p = state + _DLOSS * st_plane
    tl.store(p, tl.load(p) + tl.sum(acc_loss, axis=0))
    p = state + _DIV * st_plane
    tl.store(p, tl.load(p) + tl.sum(acc_div, axis=0))


# ---------------------------------------------------------------------------------------------------- final

@triton.jit
def _store_column_sums(col_part_ptr, which: tl.constexpr, n_row_tiles, ncols, row_tile, cols, col_mask, values):
    """col_part[which, row_tile, cols] = values summed over the tile's rows (invalid entries are 0)."""
    base = col_part_ptr + (tl.full([], which, tl.int64) * n_row_tiles + row_tile) * ncols  # int64: a scalar
    tl.store(base + cols, tl.sum(values, axis=0), mask=col_mask)


@triton.jit
def _final_kernel(
        S_ptr, teacher_ptr, idx_ptr, val_ptr, scale_ptr, bias_ptr, seg_of_class_ptr, consts_ptr, coef_ptr,
        row_part_ptr, col_part_ptr,
        col0, tcol0, rows, ncols, G, K, plane, stride_s, stride_t, n_row_tiles, n_col_tiles, inv_t, t2,
        beta, softcap, inv_softcap, uniform,
        MODE: tl.constexpr, DENSE: tl.constexpr, SPARSE: tl.constexpr,
        HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_COEF: tl.constexpr,
        WANT_DBIAS: tl.constexpr, WANT_DSCALE: tl.constexpr, SOFTCAP: tl.constexpr, UNIFORM: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    row_tile = tl.program_id(0)
    col_tile = tl.program_id(1)
    # int64 only in the per-program scalar bases (row0 * stride passes 2^31); offsets inside the tile stay int32
    # (BLOCK_R rows of a chunk, of the teacher or of the constants are far below 2^31): 2-D int64 offsets would
    # double the registers of every address in the tile.
    row0 = row_tile.to(tl.int64) * BLOCK_R
    i = tl.arange(0, BLOCK_R)  # row in the tile
    r = row0 + i
    j = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)  # local columns of the chunk
    row_mask = r < rows
    col_mask = j < ncols
    mask = row_mask[:, None] & col_mask[None, :]
    cls = col0 + j

    # per-(row, segment) constants gathered per element: a tile may straddle segments
    seg = tl.load(seg_of_class_ptr + cls, mask=col_mask, other=0)
    consts_tile = consts_ptr + row0 * G
    plane = tl.full([], 0, tl.int64) + plane  # 4 planes of rows * G constants may pass 2^31
    rs = i[:, None] * G + seg[None, :]
    inv_nt = tl.load(consts_tile + _INV_NT * plane + rs, mask=mask, other=0.0)

    u_ptrs = S_ptr + row0 * stride_s + (i[:, None] * stride_s + j[None, :])
    u = tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = u * inv_nt
    if HAS_SCALE:
        s = tl.load(scale_ptr + cls, mask=col_mask, other=0.0)[None, :]
        yh = up * s
    else:
        yh = up
    if SOFTCAP:  # y = c tanh((u + bias) / c) / T (no scale); dy/du = (1 - tanh^2) / T
        if HAS_BIAS:
            v = u + tl.load(bias_ptr + cls, mask=col_mask, other=0.0)[None, :]
        else:
            v = u
        th, cap_grad = softcap_tanh(v * inv_softcap)
        y = softcap * th * inv_t
    elif HAS_BIAS:
        y = yh + tl.load(bias_ptr + cls, mask=col_mask, other=0.0)[None, :] * inv_t
    else:
        y = yh

    if DENSE:
        # local column j is the teacher's column tcol0 + j (tcol0 = col0 for the full dense teacher)
        t_ptrs = teacher_ptr + row0 * stride_t + (i[:, None] * stride_t + (tcol0 + j)[None, :])
        t = tl.load(t_ptrs, mask=mask, other=0.0).to(tl.float32) * inv_t
    if MODE == _REVERSE_KL or MODE == _JSD:
        # no targets z: q from the student's and the teacher's log-probabilities and DBAR
        lse = tl.load(consts_tile + _LSE * plane + rs, mask=mask, other=0.0)
        dbar = tl.load(consts_tile + _DBAR * plane + rs, mask=mask, other=0.0)
        if MODE == _REVERSE_KL:
            q = reverse_kl_q(tl.exp(y - lse), y - t, dbar, t2)
        else:
            tlse = tl.load(consts_tile + _TLSE * plane + rs, mask=mask, other=0.0)
            _, _, dlp, p = jsd_element(t - tlse, y - lse, beta, tl.log(beta), tl.log(1.0 - beta))
            q = jsd_q(p, dlp, dbar, t2 * (1.0 - beta))
        z = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        loss_term = z
    else:
        if DENSE:
            if MODE == _SOFTMAX:
                tlse = tl.load(consts_tile + _TLSE * plane + rs, mask=mask, other=0.0)
            else:
                tlse = tl.zeros_like(t)
            z = tl.where(mask, dense_target(t, tlse, MODE), 0.0)
        elif SPARSE:
            # the tile's targets, found per row from its sorted list (duplicates add up)
            first = col0 + col_tile * BLOCK_C
            cursor = sparse_cursor(idx_ptr, r, row_mask, K, first, BLOCK_R)
            z, _ = sparse_tile(idx_ptr, val_ptr, r, row_mask, K, cursor, cls,
                               tl.minimum(first + BLOCK_C, col0 + ncols), BLOCK_R, BLOCK_C)
        else:
            z = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        if UNIFORM:  # e added to every class's target
            z = z + tl.where(mask, uniform, 0.0)

        if MODE == _SOFTMAX:
            lse = tl.load(consts_tile + _LSE * plane + rs, mask=mask, other=0.0)
            mass = tl.load(consts_tile + _MASS * plane + rs, mask=mask, other=0.0)
        else:
            lse = tl.zeros_like(y)
            mass = lse
        loss_term, q = loss_and_q(y, z, lse, mass, t2, MODE)
    softplus_sum = tl.sum(tl.where(mask, loss_term, 0.0), axis=1)
    q = tl.where(mask, q, 0.0)
    zy_sum = tl.sum(tl.where(mask, z * y, 0.0), axis=1)

    row_part = row_part_ptr + col_tile * rows + r
    tl.store(row_part, softplus_sum, mask=row_mask)
    tl.store(row_part + n_col_tiles * rows, zy_sum, mask=row_mask)

    if HAS_COEF:
        c = tl.load(coef_ptr + r, mask=row_mask, other=0.0)[:, None]
        cq = c * q
        if HAS_SCALE:
            s_n2 = tl.load(consts_tile + _S_N2 * plane + rs, mask=mask, other=0.0)
            grad = cq * s * inv_nt - c * u * s_n2
        elif SOFTCAP:
            grad = cq * inv_t * cap_grad
        else:
            grad = cq * inv_t
        tl.store(u_ptrs, grad.to(S_ptr.dtype.element_ty), mask=mask)
        if WANT_DBIAS:
            if SOFTCAP:  # d y / d bias = d y / d u
                db = grad
            else:
                db = cq * inv_t
            _store_column_sums(col_part_ptr, 0, n_row_tiles, ncols, row_tile, j, col_mask, db)
        if WANT_DSCALE:
            _store_column_sums(col_part_ptr, 1, n_row_tiles, ncols, row_tile, j, col_mask, cq * up)


# ---------------------------------------------------------------------------------------------------- launchers

_DIVERGENCES = (LossMode.REVERSE_KL, LossMode.JSD)


def _kernel_mode(a) -> int:
    """The kernels' MODE: KL is SOFTMAX's walk and gradient (only its loss, made in Python, differs)."""
    return int(LossMode.SOFTMAX if a.mode == LossMode.KL else a.mode)


def _teacher_col0(a) -> int:
    """The teacher's column of the chunk's first class: col0 for the full dense teacher, 0 for a chunk's teacher."""
    return a.col0 if a.teacher_col0 is None else int(a.teacher_col0)


def _options(a):
    """(softcap, 1 / softcap, uniform target) as kernel arguments, and whether each is on. They are options of
    SOFTMAX and KL without a scale; a divergence needs its teacher."""
    softcap = float(a.softcap or 0.0)
    uniform = float(a.uniform_target or 0.0)
    if (softcap or uniform) and (a.mode not in (LossMode.SOFTMAX, LossMode.KL) or a.scale is not None):
        raise ValueError(f"softcap/uniform_target: options of the modes softmax and kl without a scale, not of "
                         f"mode {a.mode.name.lower()}{' with a scale' if a.scale is not None else ''}")
    if a.mode in _DIVERGENCES and a.scale is not None:
        raise ValueError(f"scale: mode {a.mode.name.lower()} takes no self-paced scale")
    return softcap, (1.0 / softcap if softcap else 0.0), uniform


def _sparse_targets(a):
    """(tidx, tval, K) with the row stride K the kernels assume, or None when there are no sparse targets."""
    if a.teacher is not None or a.tidx is None or a.tidx.shape[1] == 0:
        return None
    return a.tidx.contiguous(), a.tval.contiguous(), a.tidx.shape[1]


def _row_block(a) -> int:
    """Columns per row_stats step: about a mean piece (from host numbers: reading piece_lo would synchronise), so
    that chunks of many small segments do not run mostly masked lanes; a few sizes, so a few compiled variants."""
    mean_piece = -(-a.ncols // max(a.pieces, 1))
    return max(_MIN_ROW_BLOCK, min(_MAX_ROW_BLOCK, triton.next_power_of_2(mean_piece)))


def row_stats(a, phases: int) -> None:
    """Fold the chunk's pieces into ``a.states`` for the requested phases (TEACHER | NORM | STATS)."""
    teacher_phase = bool(phases & Phase.TEACHER) and a.mode.terms.teacher_lse and a.teacher is not None
    norm_phase = bool(phases & Phase.NORM)
    stats_phase = bool(phases & Phase.STATS)
    if not (teacher_phase or norm_phase or stats_phase) or a.rows == 0 or a.pieces == 0:
        return
    softcap, inv_softcap, uniform = _options(a)
    if stats_phase and a.mode in _DIVERGENCES and a.teacher is None:
        raise ValueError(f"teacher: mode {a.mode.name.lower()} reads a dense teacher in STATS")
    sparse = _sparse_targets(a)
    dummy = a.piece_lo  # pointer arguments of absent inputs are never read
    st = a.states
    has_scores = a.S is not None  # the driver runs TEACHER alone before any scores exist
    block = _row_block(a)
    # the teacher phase alone is the same in every softmax-family mode: one compiled variant; the options act in
    # STATS only
    mode = _kernel_mode(a) if norm_phase or stats_phase else int(LossMode.SOFTMAX)
    _row_stats_kernel[(a.rows, a.pieces)](
        a.S if has_scores else dummy, a.teacher if a.teacher is not None else dummy,
        sparse[0] if sparse else dummy, sparse[1] if sparse else dummy,
        a.scale if a.scale is not None else dummy, a.bias if a.bias is not None else dummy,
        a.piece_lo, a.piece_seg, st,
        a.col0, _teacher_col0(a) if a.teacher is not None else 0, sparse[2] if sparse else 0,
        a.S.stride(0) if has_scores else 0, a.teacher.stride(0) if a.teacher is not None else 0,
        st.stride(0), st.stride(1), st.stride(2), float(a.inv_t), softcap, inv_softcap, uniform,
        TEACHER=teacher_phase, NORM=norm_phase, STATS=stats_phase,
        MODE=mode, DENSE=a.teacher is not None, SPARSE=sparse is not None,
        HAS_SCALE=a.scale is not None, HAS_BIAS=a.bias is not None,
        SOFTCAP=stats_phase and softcap != 0.0, UNIFORM=stats_phase and uniform != 0.0,
        BLOCK=block, BLOCK_T=_TARGET_BLOCK, num_warps=max(1, min(4, block // 256)))


def mix(a) -> None:
    """JSD's MIX over the chunk's pieces: DLOSS and DIV of ``a.states`` from the segments' LSE and TLSE in
    ``a.consts`` (filled by the driver once STATS and TEACHER are complete for the segments)."""
    if not a.mode.terms.mix or a.rows == 0 or a.pieces == 0:
        return
    _options(a)
    if a.S is None or a.teacher is None or a.consts is None:
        raise ValueError("mix: needs the scores S, the dense teacher and the constants consts")
    if not 0.0 < float(a.beta) < 1.0:
        raise ValueError(f"beta: must be in (0, 1) under mode jsd, got {a.beta}")
    st = a.states
    block = _row_block(a)
    _mix_kernel[(a.rows, a.pieces)](
        a.S, a.teacher, a.bias if a.bias is not None else a.piece_lo, a.piece_lo, a.piece_seg, st, a.consts,
        a.col0, _teacher_col0(a), a.num_segments, a.S.stride(0), a.teacher.stride(0),
        st.stride(0), st.stride(1), st.stride(2), a.rows * a.num_segments, float(a.inv_t), float(a.beta),
        HAS_BIAS=a.bias is not None, BLOCK=block, num_warps=max(1, min(4, block // 256)))


def final(a) -> None:
    """Loss row sums per column tile into ``a.row_part``; with ``a.coef`` the gradient over ``a.S`` and the bias /
    per-class scale column sums per row tile into ``a.col_part``."""
    if a.rows == 0 or a.ncols == 0:
        return
    softcap, inv_softcap, uniform = _options(a)
    if a.mode in _DIVERGENCES and a.teacher is None:
        raise ValueError(f"teacher: mode {a.mode.name.lower()} reads a dense teacher in FINAL")
    block_r, block_c = TILE
    n_row_tiles, n_col_tiles = triton.cdiv(a.rows, block_r), triton.cdiv(a.ncols, block_c)
    has_coef = a.coef is not None
    want_dbias = has_coef and bool(a.want_dbias) and a.col_part is not None
    want_dscale = has_coef and bool(a.want_dscale) and a.col_part is not None
    sparse = _sparse_targets(a)
    dummy = a.row_part
    _final_kernel[(n_row_tiles, n_col_tiles)](
        a.S, a.teacher if a.teacher is not None else dummy,
        sparse[0] if sparse else dummy, sparse[1] if sparse else dummy,
        a.scale if a.scale is not None else dummy, a.bias if a.bias is not None else dummy,
        a.seg_of_class, a.consts, a.coef if has_coef else dummy,
        a.row_part, a.col_part if a.col_part is not None else dummy,
        a.col0, _teacher_col0(a) if a.teacher is not None else 0, a.rows, a.ncols, a.num_segments,
        sparse[2] if sparse else 0,
        a.rows * a.num_segments,  # consts plane size from the host: an int64 argument once it passes 2^31
        a.S.stride(0), a.teacher.stride(0) if a.teacher is not None else 0,
        n_row_tiles, n_col_tiles, float(a.inv_t), float(a.t2),
        float(a.beta), softcap, inv_softcap, uniform,
        MODE=_kernel_mode(a), DENSE=a.teacher is not None, SPARSE=sparse is not None,
        HAS_SCALE=a.scale is not None, HAS_BIAS=a.bias is not None, HAS_COEF=has_coef,
        WANT_DBIAS=want_dbias, WANT_DSCALE=want_dscale, SOFTCAP=softcap != 0.0, UNIFORM=uniform != 0.0,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_FINAL_WARPS)


EPILOGUE = DeviceEpilogue(sys.modules[__name__])  # the driver's interface over the kernels above
