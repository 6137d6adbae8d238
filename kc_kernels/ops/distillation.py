"""Public front of the fused distillation loss: a hard-label cross-entropy and a soft term against a teacher in one
call (docs/ops.md, "linear_distillation_loss"), as Liger-Kernel's fused distillation losses mix them.

    loss = weight_hard * CE(y, labels) + weight_soft * D(teacher || student)

per row (D one of linear_soft_target_loss's softmax-family modes, T^2 included), averaged over the rows whose label
is not ignore_index. At temperature 1 with the modes softmax and kl (the hard term's softmax is then the soft
term's, and its gradient p_j - [j = label] is the softmax's own q with the label's weight added to the target
mass), a backend that implements the feature "hard_mix" runs both terms in one walk over the classes: four GEMMs
with a teacher head, as the soft term alone. Elsewhere (reverse_kl and jsd, whose gradients have no mass term, or
another temperature) the two terms are two walks.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from kc_kernels import dispatch
from kc_kernels.ops import checks
from kc_kernels.ops.cross_entropy import linear_cross_entropy
from kc_kernels.ops.soft_target import _dispatch, linear_problem, linear_soft_target_loss

SOFT_MODES = ("softmax", "kl", "reverse_kl", "jsd")
Result = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def linear_distillation_loss(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                             labels: Optional[torch.Tensor] = None, *, teacher_logits: Optional[torch.Tensor] = None,
                             teacher_x: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                             teacher_bias: Optional[torch.Tensor] = None, mode: str = "kl", beta: float = 0.5,
                             temperature: float = 1.0, weight_hard: float = 0.5, weight_soft: float = 0.5,
                             ignore_index: int = -100, reduction: str = "mean", return_parts: bool = False,
                             backend: str = "auto", memory_budget: Optional[int] = None) -> Result:
    """weight_hard * CE(logits, labels) + weight_soft * D(teacher || student) per row, without [B, V] logits.

    x [..., H], weight [V, H], bias [V], labels [...] (a class or ignore_index). The teacher: teacher_logits
    [..., V], or a head (teacher_x [..., Ht], teacher_weight [V, Ht], teacher_bias [V]). mode: the soft term's
    divergence ("kl", "reverse_kl", "jsd" with beta, or "softmax": cross-entropy against the teacher's softmax),
    at ``temperature`` and times T^2; the hard term is at temperature 1. Rows whose label is ignore_index count in
    neither term; "mean" divides by the rows counted (0 when none), "none" gives per-row values in the labels'
    shape. return_parts: (loss, hard part, soft part), each already weighted and reduced alike (the parts carry no
    gradient).
    """
    checks.tensor("x", x, floating=True)
    if labels is None:
        checks.fail("labels", "is required (one class index per row of x; ignore_index where there is none)")
    checks.tensor("labels", labels, integer=True)
    if tuple(labels.shape) != tuple(x.shape[:-1]):
        checks.fail("labels", f"shape {tuple(labels.shape)} differs from x's rows {tuple(x.shape[:-1])}")
    mode = checks.choice("mode", mode, SOFT_MODES)
    for name, v in (("weight_hard", weight_hard), ("weight_soft", weight_soft)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v) >= 0 or v == float("inf"):
            checks.fail(name, f"must be a finite number >= 0, got {v!r}")
    reduction = checks.choice("reduction", reduction, ("none", "sum", "mean"))
    lead = tuple(labels.shape)
    x2 = x.reshape(-1, x.shape[-1])
    lab = labels.reshape(-1)
    B = x2.shape[0]
    if teacher_logits is not None:
        teacher_logits = teacher_logits.reshape(B, -1) if teacher_logits.dim() > 2 else teacher_logits
    if teacher_x is not None and teacher_x.dim() > 2:
        teacher_x = teacher_x.reshape(B, teacher_x.shape[-1])
    valid = lab != ignore_index
    cdt = torch.float64 if x2.dtype == torch.float64 else torch.float32
    w = valid.to(cdt)
    if reduction == "mean":
        n = w.sum()
        w = torch.where(n > 0, w / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(w))
    inner = "none" if reduction == "none" else "sum"
    one_walk = _one_walk(x2, weight, bias, lab, valid, w, teacher_logits, teacher_x, teacher_weight, teacher_bias,
                         mode, temperature, weight_hard, weight_soft, inner, return_parts, backend, memory_budget)
    if one_walk is not None:
        loss = one_walk.reshape(lead) if reduction == "none" else one_walk
        return loss
    hard = linear_cross_entropy(x2, weight, bias, lab, ignore_index=ignore_index, reduction=inner,
                                sample_weight=w if reduction != "none" else None, backend=backend,
                                memory_budget=memory_budget)
    soft = linear_soft_target_loss(x2, weight, bias, teacher_logits=teacher_logits, teacher_x=teacher_x,
                                   teacher_weight=teacher_weight, teacher_bias=teacher_bias, mode=mode, beta=beta,
                                   temperature=temperature, sample_weight=w if reduction != "none" else valid.to(cdt),
                                   reduction=inner, backend=backend, memory_budget=memory_budget)
    hard, soft = weight_hard * hard, weight_soft * soft
    loss = hard + soft
    if reduction == "none":
        loss, hard, soft = loss.reshape(lead), hard.reshape(lead), soft.reshape(lead)
    if return_parts:
        return loss, hard.detach(), soft.detach()
    return loss


def _one_walk(x, weight, bias, lab, valid, w, teacher_logits, teacher_x, teacher_weight, teacher_bias, mode,
              temperature, weight_hard, weight_soft, reduction, return_parts, backend, memory_budget
              ) -> Optional[torch.Tensor]:
    """Both terms in one walk where that is exact and the backend implements it, else None (two walks)."""
    if (temperature != 1.0 or mode not in ("softmax", "kl") or weight_soft <= 0 or weight_hard <= 0 or return_parts
            or x.dim() != 2):
        return None
    p = linear_problem(x, weight, bias, teacher_logits=teacher_logits, teacher_x=teacher_x,
                       teacher_weight=teacher_weight, teacher_bias=teacher_bias, mode=mode,
                       sample_weight=(w * weight_soft).to(torch.float32 if x.dtype != torch.float64 else x.dtype),
                       reduction=reduction, memory_budget=memory_budget)
    p.hard_labels = torch.where(valid, lab, torch.full_like(lab, -1)).long()
    p.hard_weight = float(weight_hard) / float(weight_soft)
    try:
        _, row = dispatch.resolve("linear_soft_target_loss", backend, x.device, x.dtype, p.features)
    except ValueError:
        return None
    if "hard_mix" not in row.features:
        return None
    return _dispatch("linear_soft_target_loss", p, backend, x.device)
