"""The loss modes in Triton: the mirror of kc_kernels.loss_modes.LossMode and of the C++ LossTerms<MODE>
(csrc/common/soft_target_math.h) for the Triton epilogue kernels. The constants are checked against the IntEnum and
the compiled extensions in tests/test_layout.py. A mode's per-element terms are the jit functions below; the
epilogue kernels take the mode as a ``MODE: tl.constexpr`` argument; KL runs as SOFTMAX (the same walk and gradient,
only its loss differs, in Python), so the kernels meet SIGMOID, SOFTMAX, REVERSE_KL and JSD."""
from __future__ import annotations

import triton
import triton.language as tl

from kc_kernels.triton._soft_target_tiles import log_add_exp, sigmoid, softplus_and_sigmoid, weighted_log_ratio

SIGMOID = tl.constexpr(0)
SOFTMAX = tl.constexpr(1)
KL = tl.constexpr(2)
REVERSE_KL = tl.constexpr(3)
JSD = tl.constexpr(4)


@triton.jit
def dense_target(t, tlse, MODE: tl.constexpr):  # noqa: ANN201  (a jit function)
    """z of a dense teacher logit ``t`` (already divided by T): sigmoid(t), or exp(t - tlse) with the segment's
    teacher log-sum-exp."""
    if MODE == SOFTMAX:
        z = tl.exp(t - tlse)
    else:
        z = sigmoid(t)
    return z


@triton.jit
def loss_and_q(y, z, lse, mass, t2, MODE: tl.constexpr):  # noqa: ANN201
    """(the per-element loss term FINAL sums, q = dl/dy). Sigmoid: (softplus(y), sigmoid(y) - z); softmax: its loss
    comes from the statistics (term 0), q = T^2 (m softmax(y) - z)."""
    if MODE == SOFTMAX:
        q = t2 * (mass * tl.exp(y - lse) - z)
        term = tl.zeros_like(q)
    else:
        term, sg = softplus_and_sigmoid(y)
        q = sg - z
    return term, q


# ---- the divergences (always a dense teacher): lp = y - lse, lz = t/T - tlse per row and segment

@triton.jit
def jsd_element(lz, lp, beta, log_beta, log_1mbeta):  # noqa: ANN201
    """One class of the JSD with M = beta z + (1 - beta) p (log_beta = log(beta), log_1mbeta = log(1 - beta)):
    (loss = beta z (lz - lm) + (1 - beta) p (lp - lm), div = p (lp - lm), dlp = lp - lm, p = exp(lp))."""
    z = tl.exp(lz)
    p = tl.exp(lp)
    lm = log_add_exp(lz + log_beta, lp + log_1mbeta)
    dlp = lp - lm
    sp = weighted_log_ratio(p, dlp)
    return beta * weighted_log_ratio(z, lz - lm) + (1.0 - beta) * sp, sp, dlp, p


@triton.jit
def reverse_kl_q(p, d, dbar, t2):  # noqa: ANN201
    """q of the reverse KL: T^2 p ((y - t/T) - DBAR), d = y - t/T, DBAR = sum_j p_j d_j."""
    return t2 * (p * (d - dbar))


@triton.jit
def jsd_q(p, dlp, dbar, t2_1mbeta):  # noqa: ANN201
    """q of the JSD: T^2 (1 - beta) p ((lp - lm) - DBAR), DBAR = sum_j p_j (lp_j - lm_j)."""
    return t2_1mbeta * weighted_log_ratio(p, dlp - dbar)
