"""The loss family: a loss mode is an IntEnum whose own terms live in one place per language.

- Python (here): which statistics a mode keeps, the per-row loss from the statistics, and the segment sums a
  self-paced scale's gradient needs (the driver and the GPU epilogue's constants use them).
- C++ and CUDA: ``kc::LossMode`` (an X-macro list) and its ``LossTerms<MODE>`` specialisation in
  csrc/common/soft_target_math.h.
- Triton: kc_kernels/triton/loss_modes.py.
- The definition: kc_kernels/reference.py.
The values are checked against the compiled extensions (layout.check_layout) and the Triton constants (a test).
Adding a mode: docs/architecture.md, "Adding a loss mode".
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Dict, Tuple

import torch

from kc_kernels.layout import State


class LossMode(IntEnum):
    SIGMOID = 0  # binary cross-entropy per class: sum_j softplus(y_j) - z_j y_j
    SOFTMAX = 1  # cross-entropy per segment: T^2 sum_g (m_g lse_g(y) - sum_j z_j y_j)
    KL = 2  # forward KL(z || p) per segment: SOFTMAX plus the teacher's sum z log z (same gradient)
    REVERSE_KL = 3  # KL(p || z) per segment, T^2 sum_j p_j (log p_j - log z_j)
    JSD = 4  # generalized Jensen-Shannon per segment with M = beta z + (1 - beta) p, times T^2

    @classmethod
    def of(cls, name: str) -> "LossMode":
        """The mode of the ops' ``mode`` argument ("sigmoid", "softmax", "kl", "reverse_kl", "jsd")."""
        return cls[name.upper()]

    @property
    def terms(self) -> "ModeTerms":
        return TERMS[self]


def _sigmoid_row_loss(st: torch.Tensor, softplus: torch.Tensor, t2: float) -> torch.Tensor:
    return softplus - st[State.ZY].sum(dim=1)  # softplus sums come from FINAL


def _softmax_row_loss(st: torch.Tensor, softplus: torch.Tensor, t2: float) -> torch.Tensor:
    lse = st[State.MAX] + torch.log(st[State.SUMEXP])
    zl = torch.where(st[State.ZSUM] != 0, st[State.ZSUM] * lse, torch.zeros_like(lse))
    return t2 * (zl - st[State.ZY]).sum(dim=1)


def _lse(st: torch.Tensor) -> torch.Tensor:
    return st[State.MAX] + torch.log(st[State.SUMEXP])


def _teacher_lse(st: torch.Tensor) -> torch.Tensor:
    return st[State.TMAX] + torch.log(st[State.TSUMEXP])


def _kl_row_loss(st: torch.Tensor, softplus: torch.Tensor, t2: float) -> torch.Tensor:
    # sum_j z log z = TENT / TSUMEXP - tlse per segment of a dense teacher; sparse targets have no teacher phase
    # (TSUMEXP = 0): their sum v log v is added by the driver from the values (sparse_entropy)
    dense = st[State.TSUMEXP] > 0
    ent = torch.where(dense, st[State.TENT] / torch.where(dense, st[State.TSUMEXP], 1.0) - _teacher_lse(st), 0.0)
    return _softmax_row_loss(st, softplus, t2) + t2 * ent.sum(dim=1)


def _reverse_kl_row_loss(st: torch.Tensor, softplus: torch.Tensor, t2: float) -> torch.Tensor:
    return t2 * (st[State.DIV] / st[State.SUMEXP] - _lse(st) + _teacher_lse(st)).sum(dim=1)


def _jsd_row_loss(st: torch.Tensor, softplus: torch.Tensor, t2: float) -> torch.Tensor:
    return t2 * st[State.DLOSS].sum(dim=1)


def _no_scale(st: torch.Tensor, t2: float) -> Tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError("the divergence modes take no self-paced scale (the op front refuses it)")


def _sigmoid_scale_terms(st: torch.Tensor, t2: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return st[State.SUMEXP_U] - st[State.ZU], st[State.SUMEXP_Y] - st[State.ZYH]


def _softmax_scale_terms(st: torch.Tensor, t2: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return (t2 * (st[State.ZSUM] * st[State.SUMEXP_U] / st[State.SUMEXP] - st[State.ZU]),
            t2 * (st[State.ZSUM] * st[State.SUMEXP_Y] / st[State.SUMEXP] - st[State.ZYH]))


def _no_dbar(st: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(st[State.MAX])


def _reverse_kl_dbar(st: torch.Tensor) -> torch.Tensor:
    return st[State.DIV] / st[State.SUMEXP]


def _jsd_dbar(st: torch.Tensor) -> torch.Tensor:
    return st[State.DIV]


@dataclass(frozen=True)
class ModeTerms:
    """A mode's own part of the walk (the C++ LossTerms<MODE> mirrors the first two)."""

    segment_lse: bool  # keeps a log-sum-exp per (row, segment): STATS always runs, FINAL only for gradients
    teacher_lse: bool  # a dense teacher's targets need the teacher's log-sum-exp (the TEACHER phase)
    row_loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (states, softplus sums, T^2) -> [B]
    scale_grad_terms: Callable[[torch.Tensor, float], Tuple[torch.Tensor, torch.Tensor]]  # -> (R, S) per segment
    mix: bool = False  # runs the MIX phase between STATS and FINAL (sums that need the finished log-sum-exp)
    dense_teacher: bool = False  # reads the teacher at every class: sparse targets become a dense teacher first
    takes_scale: bool = True  # a self-paced scale is defined for it
    sparse_entropy: bool = False  # its loss adds sum v log v of sparse targets (the driver, from the values)
    dbar: Callable[[torch.Tensor], torch.Tensor] = _no_dbar  # the DBAR constant of FINAL from the states


TERMS: Dict[LossMode, ModeTerms] = {
    LossMode.SIGMOID: ModeTerms(False, False, _sigmoid_row_loss, _sigmoid_scale_terms),
    LossMode.SOFTMAX: ModeTerms(True, True, _softmax_row_loss, _softmax_scale_terms),
    LossMode.KL: ModeTerms(True, True, _kl_row_loss, _softmax_scale_terms, sparse_entropy=True),
    LossMode.REVERSE_KL: ModeTerms(True, True, _reverse_kl_row_loss, _no_scale, dense_teacher=True,
                                   takes_scale=False, dbar=_reverse_kl_dbar),
    LossMode.JSD: ModeTerms(True, True, _jsd_row_loss, _no_scale, mix=True, dense_teacher=True, takes_scale=False,
                            dbar=_jsd_dbar),
}
MODE_NAMES = tuple(m.name.lower() for m in LossMode)  # the ops' ``mode`` argument
