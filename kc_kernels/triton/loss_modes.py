"""The loss modes in Triton: the mirror of kc_kernels.loss_modes.LossMode and of the C++ LossTerms<MODE>
(csrc/common/soft_target_math.h) for the Triton epilogue kernels. The constants are checked against the IntEnum and
the compiled extensions in tests/test_layout.py. A mode's per-element terms are the jit functions below; the
epilogue kernels take the mode as a ``MODE: tl.constexpr`` argument."""
from __future__ import annotations

import triton
import triton.language as tl

from kc_kernels.triton._soft_target_tiles import sigmoid, softplus_and_sigmoid

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
