"""Drop-in forms for code written against Liger-Kernel's fused distillation loss, Apple's Cut Cross-Entropy and
Hugging Face causal language models, built only on kc's public ops (docs/ops.md, "Drop-in forms").

    from kc_kernels.compat import LigerFusedLinearJSDLoss      # liger_kernel.chunked_loss.LigerFusedLinearJSDLoss
    from kc_kernels.compat import linear_cross_entropy         # cut_cross_entropy.linear_cross_entropy
    from kc_kernels.compat import causal_lm_loss               # model(input_ids, labels=labels).loss

Each takes the arguments of the function it stands for, in the same order and with the same defaults, and gives the
same values and gradients (tests/test_compat_liger.py, tests/test_compat_cce.py, tests/test_compat_hf.py compare
them with the originals). Tuning knobs of the originals that choose how they compute (chunk sizes, compilation,
gradient filtering, the kernel implementation) are accepted and ignored: kc chooses its own class chunks from a
memory budget.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch

from kc_kernels.ops import linear_cross_entropy as _kc_linear_cross_entropy
from kc_kernels.ops import linear_distillation_loss as _kc_linear_distillation_loss
from kc_kernels.ops import linear_soft_target_loss as _kc_linear_soft_target_loss

__all__ = ["LigerFusedLinearJSDLoss", "linear_cross_entropy", "LinearCrossEntropy", "causal_lm_loss"]

Tensor = torch.Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class LigerFusedLinearJSDLoss(torch.nn.Module):
    """Liger-Kernel's ``LigerFusedLinearJSDLoss``: ``weight_hard_loss * CE + weight_soft_loss * JSD_beta``.

    Per token, with the student's logits ``s = student_input @ student_weight.T + student_bias`` and the teacher's
    ``t = teacher_input @ teacher_weight.T + teacher_bias`` (the teacher gets no gradient):

    - the hard loss is the cross-entropy of ``s`` (temperature 1) against ``true_labels``;
    - the soft loss compares ``P = softmax(t / temperature)`` and ``Q = softmax(s / temperature)``: ``beta == 0``
      gives ``KL(P || Q)``, ``beta == 1`` gives ``KL(Q || P)``, otherwise ``beta KL(P || M) + (1 - beta) KL(Q || M)``
      with ``M = beta P + (1 - beta) Q``. There is no ``temperature^2`` factor (kc's divergences carry one; it is
      divided out here).

    Tokens whose label is ``ignore_index`` count in neither term, and both terms are summed over the other tokens
    and divided by their number (at least 1). ``return_soft_hard_loss=True`` returns ``(loss, soft_loss,
    hard_loss)``, the two parts unweighted and without gradient.

    ``compiled`` and ``chunk_size`` are accepted for compatibility and ignored: kc chooses its own class chunks
    (from a memory budget) and needs no compilation.

    A teacher with more classes than the student (a padded vocabulary) is handled as Liger-Kernel does: the
    student's logits at the extra classes are 0 in the soft term.
    """

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, compiled: bool = True, chunk_size: int = 1024,
                 return_soft_hard_loss: bool = False):
        super().__init__()
        if temperature == 0:
            raise ValueError("temperature: cannot be 0")
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta: must be in [0, 1], got {beta!r}")
        self.weight_hard_loss = weight_hard_loss
        self.weight_soft_loss = weight_soft_loss
        self.beta = beta
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss

    def extra_repr(self) -> str:
        return (f"weight_hard_loss={self.weight_hard_loss}, weight_soft_loss={self.weight_soft_loss}, "
                f"beta={self.beta}, ignore_index={self.ignore_index}, temperature={self.temperature}")

    def _mode(self) -> str:
        return "kl" if self.beta == 0 else "reverse_kl" if self.beta == 1 else "jsd"

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
                true_labels: Tensor, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor]]:
        """student_input [N, H] (or [..., H]), student_weight [V, H], teacher_input [N, Ht], teacher_weight
        [Vt, Ht] (Vt >= V), true_labels [N], student_bias [V], teacher_bias [Vt]. Returns the loss (fp32; fp64 for
        fp64 inputs), or (loss, soft_loss, hard_loss)."""
        x = student_input.reshape(-1, student_input.shape[-1])
        tx = teacher_input.reshape(-1, teacher_input.shape[-1])
        labels = true_labels.reshape(-1)
        V, Vt = student_weight.shape[0], teacher_weight.shape[0]
        if Vt < V:
            raise ValueError(f"teacher_weight: has {Vt} classes, fewer than the student's {V}")
        T = float(self.temperature)
        wh, ws = float(self.weight_hard_loss), float(self.weight_soft_loss)
        mode, beta = self._mode(), float(self.beta)
        head: Dict[str, Any] = dict(teacher_x=tx, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                                    mode=mode, beta=beta, temperature=T)
        if Vt == V and not self.return_soft_hard_loss and wh >= 0 and ws >= 0:
            if wh == 0:  # no hard term: Liger-Kernel skips its cross-entropy too
                return ws * self._soft(x, student_weight, student_bias, labels, head, T)
            # kc's divergences carry T^2; Liger-Kernel's do not
            return _kc_linear_distillation_loss(x, student_weight, student_bias, labels, weight_hard=wh,
                                                weight_soft=ws / (T * T), ignore_index=self.ignore_index,
                                                reduction="mean", **head)
        hard = _kc_linear_cross_entropy(x, student_weight, student_bias, labels, ignore_index=self.ignore_index,
                                        reduction="mean")
        assert isinstance(hard, torch.Tensor)
        if Vt > V:  # Liger-Kernel pads the student's logits with zeros up to the teacher's classes
            pad = Vt - V
            student_weight = torch.cat([student_weight, student_weight.new_zeros(pad, student_weight.shape[1])])
            if student_bias is not None:
                student_bias = torch.cat([student_bias, student_bias.new_zeros(pad)])
        soft = self._soft(x, student_weight, student_bias, labels, head, T)
        loss = wh * hard + ws * soft
        if self.return_soft_hard_loss:
            return loss, soft.detach(), hard.detach()
        return loss

    def _soft(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, head: Dict[str, Any],
              T: float) -> Tensor:
        """The soft term: the divergence summed over the counted tokens, divided by their number and by T^2."""
        valid = (labels != self.ignore_index).to(_compute_dtype(x))
        w = valid / (valid.sum().clamp_min(1.0) * (T * T))
        return _kc_linear_soft_target_loss(x, weight, bias, sample_weight=w, reduction="sum", **head)


def _shift_labels(targets: Tensor, shift: int, ignore_index: int) -> Tensor:
    """targets[..., t + shift] at position t, ignore_index in the last ``shift`` positions."""
    if shift == 0:
        return targets
    T = targets.shape[-1]
    k = min(shift, T)
    tail = targets.new_full((*targets.shape[:-1], k), ignore_index)
    return torch.cat([targets[..., k:], tail], dim=-1)


def linear_cross_entropy(e: Tensor, c: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, softcap: Optional[float] = None, reduction: str = "mean",
                         shift: Union[bool, int] = False, return_lse: bool = False,
                         filter_eps: Union[float, str, None] = "auto", accum_e_fp32: bool = False,
                         accum_c_fp32: bool = False, filter_e_grad: bool = True, filter_c_grad: bool = True,
                         impl: object = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Cut Cross-Entropy's ``linear_cross_entropy``: cross-entropy of ``e @ c.T + bias`` against ``targets``.

    e [..., D] embeddings, c [V, D] classifier, targets [...] (int, a class or ``ignore_index``), bias [V].
    ``softcap``: the logits become ``softcap * tanh(logits / softcap)``. ``shift`` (True = 1, or an int k >= 0):
    position t of ``e`` predicts ``targets[..., t + k]``, as in causal language modelling, and the last k positions
    of ``e`` take no part. Ignored targets count for nothing: "mean" averages over the others, "sum" sums, "none"
    returns per-position losses shaped like ``targets`` (``targets.shape[:-1] + (T - k,)`` under a shift, entry t
    being the loss of ``e[..., t]`` against ``targets[..., t + k]``), 0 at ignored targets. ``return_lse=True`` (the
    newer CCE releases) also returns the log-sum-exp per position shaped like the "none" loss, 0 at ignored
    targets. Losses are fp32 (fp64 for fp64 inputs).

    The ``bias`` argument and ``return_lse`` are those of CCE releases after 25.1.1, which put ``bias`` fourth; a
    25.1.1 call that passed ``ignore_index`` positionally must name it. ``filter_eps``, ``accum_e_fp32``,
    ``accum_c_fp32``, ``filter_e_grad``, ``filter_c_grad`` and ``impl`` choose how CCE computes and are ignored:
    kc computes every gradient exactly (no filtering of small softmax values) in its own class chunks.

    One difference: "mean" over no counted target is 0 here (CCE divides 0 by 0 and returns NaN).
    """
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias: expected a tensor or None, got {type(bias).__name__} (the fourth argument is the "
                        f"bias; pass ignore_index by name)")
    if tuple(e.shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"targets: shape {tuple(targets.shape)} differs from e's positions {tuple(e.shape[:-1])}")
    if isinstance(shift, bool) or shift is None:
        k = int(bool(shift))
    else:
        k = int(shift)
        if k < 0:
            raise ValueError(f"shift: must be a bool or an int >= 0, got {shift!r}")
    if k and targets.dim() == 0:
        raise ValueError("targets: a shift needs a sequence dimension")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: must be one of 'mean', 'sum', 'none', got {reduction!r}")
    labels = _shift_labels(targets, k, ignore_index)
    out = _kc_linear_cross_entropy(e, c, bias, labels, ignore_index=ignore_index, softcap=softcap,
                                   reduction=reduction, return_lse=return_lse)
    loss, lse = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
    T = targets.shape[-1] if k else 0
    if reduction == "none" and k:
        loss = loss[..., :max(T - k, 0)]
    if lse is None:
        return loss
    lse = torch.where(labels != ignore_index, lse, torch.zeros_like(lse))
    if k:
        lse = lse[..., :max(T - k, 0)]
    return loss, lse


class LinearCrossEntropy(torch.nn.Module):
    """Cut Cross-Entropy's ``LinearCrossEntropy`` module: ``forward(e, c, targets, bias=None)`` calls
    :func:`linear_cross_entropy` with the options given here (``filter_eps`` and ``impl`` are ignored)."""

    def __init__(self, ignore_index: int = -100, softcap: Optional[float] = None, reduction: str = "mean",
                 filter_eps: Union[float, str, None] = "auto", shift: Union[bool, int] = False, impl: object = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.softcap = softcap
        self.reduction = reduction
        self.filter_eps = filter_eps
        self.shift = shift
        self.impl = impl

    def forward(self, e: Tensor, c: Tensor, targets: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        out = linear_cross_entropy(e, c, targets, bias, ignore_index=self.ignore_index, softcap=self.softcap,
                                   reduction=self.reduction, shift=self.shift)
        assert isinstance(out, torch.Tensor)
        return out


def causal_lm_loss(hidden_states: Tensor, lm_head: Union[torch.nn.Linear, Tensor], labels: Tensor, *,
                   ignore_index: int = -100, shift: bool = True, reduction: str = "mean",
                   softcap: Optional[float] = None, num_items_in_batch: Union[int, Tensor, None] = None) -> Tensor:
    """The loss a Hugging Face causal LM returns for ``model(input_ids, labels=labels).loss``, without its logits.

    hidden_states [batch, seq, H]: the last hidden states (``outputs.hidden_states[-1]`` with
    ``output_hidden_states=True``, or the base model's ``last_hidden_state``, i.e. after the final norm);
    lm_head: the model's output layer (``model.lm_head``, an ``nn.Linear`` with or without bias) or its weight
    [V, H]; labels [batch, seq] as given to the model (``ignore_index`` where there is no target). With
    ``shift=True`` (the models' own convention) position t predicts ``labels[..., t + 1]``; with ``shift=False``
    the labels are taken as already aligned. ``softcap``: the model's final logit soft-capping
    (``config.final_logit_softcapping``, e.g. Gemma 2), if any. ``num_items_in_batch`` (as the Trainer passes it
    under gradient accumulation): the summed loss divided by it, in place of the mean. "none" gives per-position
    losses ([batch, seq - 1] under the shift), 0 at ignored targets.
    """
    if isinstance(lm_head, torch.nn.Linear):
        weight, bias = lm_head.weight, lm_head.bias
    elif isinstance(lm_head, torch.Tensor):
        weight, bias = lm_head, None
    else:
        raise TypeError(f"lm_head: expected an nn.Linear or a weight tensor, got {type(lm_head).__name__}")
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError(f"num_items_in_batch: replaces the mean; reduction must be 'mean', got {reduction!r}")
        total = linear_cross_entropy(hidden_states, weight, labels, bias, ignore_index=ignore_index,
                                     softcap=softcap, reduction="sum", shift=shift)
        assert isinstance(total, torch.Tensor)
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    out = linear_cross_entropy(hidden_states, weight, labels, bias, ignore_index=ignore_index, softcap=softcap,
                               reduction=reduction, shift=shift)
    assert isinstance(out, torch.Tensor)
    return out
