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

    @classmethod
    def of(cls, name: str) -> "LossMode":
        """The mode of the ops' ``mode`` argument ("sigmoid", "softmax")."""
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


def _sigmoid_scale_terms(st: torch.Tensor, t2: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return st[State.SUMEXP_U] - st[State.ZU], st[State.SUMEXP_Y] - st[State.ZYH]


def _softmax_scale_terms(st: torch.Tensor, t2: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return (t2 * (st[State.ZSUM] * st[State.SUMEXP_U] / st[State.SUMEXP] - st[State.ZU]),
            t2 * (st[State.ZSUM] * st[State.SUMEXP_Y] / st[State.SUMEXP] - st[State.ZYH]))


@dataclass(frozen=True)
class ModeTerms:
    """A mode's own part of the walk (the C++ LossTerms<MODE> mirrors the first two)."""

    segment_lse: bool  # keeps a log-sum-exp per (row, segment): STATS always runs, FINAL only for gradients
    teacher_lse: bool  # a dense teacher's targets need the teacher's log-sum-exp (the TEACHER phase)
    row_loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (states, softplus sums, T^2) -> [B]
    scale_grad_terms: Callable[[torch.Tensor, float], Tuple[torch.Tensor, torch.Tensor]]  # -> (R, S) per segment


TERMS: Dict[LossMode, ModeTerms] = {
    LossMode.SIGMOID: ModeTerms(False, False, _sigmoid_row_loss, _sigmoid_scale_terms),
    LossMode.SOFTMAX: ModeTerms(True, True, _softmax_row_loss, _softmax_scale_terms),
}
MODE_NAMES = tuple(m.name.lower() for m in LossMode)  # the ops' ``mode`` argument
