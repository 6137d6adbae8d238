"""The chunked soft-target loss as one torch.library op, ``kc_kernels::chunked_soft_target`` (and its backward op),
so that torch.compile and torch.export see one opaque node with a fake (shape-only) implementation; the op runs a
``Sweep`` (kc_kernels/driver.py) with the epilogue of the backend named by its ``backend`` argument (its row in
kc_kernels/dispatch.py). With reduction="none" the per-row weights of the gradient are only known in backward, so
the forward computes the loss alone and the backward op walks again.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from kc_kernels.custom_op import needs_mask, register_forward_made_grads
from kc_kernels.driver import Epilogue, Sweep, reduce_rows, row_coef
from kc_kernels.reduction import compute_dtype

# The walk is one torch.library op, so torch.compile and torch.export see a single opaque node with a fake
# (shape-only) implementation instead of tracing into the driver. Problems are not op arguments: the op takes the
# tensors and primitives a problem is made of, and the backend's name (its epilogue is looked up in the table).

GRAD_INPUTS = 4  # gradient slots of the op: (x or logits, weight, bias, scale)


def _epilogue(name: str) -> Epilogue:
    from kc_kernels import dispatch

    return dispatch.epilogue("soft_target_loss", name)


def _problem(inp, weight, bias, scale, target_index, target_value, teacher_logits, sample_weight, teacher_x,
             teacher_weight, teacher_bias, segments, bounds, mode, reduction, temperature, options):
    """The problem the op's arguments describe (validated by the op front before the op was called).
    ``options``: [beta, softcap (0: none), z_loss, uniform_target] and optionally hard_weight: when it is > 0,
    target_index [B, 1] holds hard labels (-1: none) of a hard-label term mixed into the walk of a dense teacher
    (linear_distillation_loss), not sparse targets. Empty ``bounds``: the offsets are the values of ``segments``,
    read (and checked) here, where the op runs, not where a graph was traced."""
    from kc_kernels.ops import checks
    from kc_kernels.ops.soft_target import SoftTargetProblem

    linear = weight is not None
    if not bounds:
        V = weight.shape[0] if linear else inp.shape[1]
        bounds = [0, V] if segments is None else checks.bounds_of(segments, V)
    beta, softcap, z_loss, uniform_target = options[:4]
    hard_weight = options[4] if len(options) > 4 else 0.0
    hard_labels = None
    if hard_weight > 0:
        hard_labels, target_index, target_value = target_index[:, 0], None, None
    return SoftTargetProblem(batch=inp.shape[0], num_classes=weight.shape[0] if linear else inp.shape[1], mode=mode,
                             reduction=reduction, temperature=temperature, x=inp if linear else None,
                             weight=weight, bias=bias, logits=None if linear else inp, target_index=target_index,
                             target_value=target_value, teacher_logits=teacher_logits, teacher_x=teacher_x,
                             teacher_weight=teacher_weight, teacher_bias=teacher_bias, segments=segments,
                             bounds=list(bounds),
                             scale=scale, sample_weight=sample_weight, beta=beta, softcap=softcap or None,
                             z_loss=z_loss, uniform_target=uniform_target, hard_labels=hard_labels,
                             hard_weight=hard_weight)


def _options(p) -> List[float]:
    opts = [float(p.beta), float(p.softcap or 0.0), float(p.z_loss), float(p.uniform_target)]
    return opts + [float(p.hard_weight)] if p.hard_labels is not None else opts


def _grad_names(linear: bool, needs: int) -> Tuple[str, ...]:
    """The driver's names of the inputs whose gradient bit is set in ``needs`` (bit i: gradient slot i)."""
    names = ("x", "weight", "bias", "scale") if linear else ("logits", None, None, "scale")
    return tuple(n for i, n in enumerate(names) if n is not None and needs >> i & 1)


def _grad_slots(inp, weight, bias, scale, needs: int, grads: Optional[Dict[str, Optional[torch.Tensor]]]):
    """The op's four gradient outputs: the gradient where its bit is set (an empty tensor of that shape for the
    fake implementation, grads None), else an empty placeholder (ops cannot return None)."""
    slots = []
    names = ("x" if weight is not None else "logits", "weight", "bias", "scale")
    for i, (name, t) in enumerate(zip(names, (inp, weight, bias, scale))):
        if t is None or not needs >> i & 1:
            slots.append(inp.new_empty(0))
        elif grads is None:
            slots.append(torch.empty(t.shape, dtype=t.dtype, device=t.device))
        else:
            slots.append(grads[name])
    return tuple(slots)


def _out_dtype(inp: torch.Tensor) -> torch.dtype:
    return compute_dtype(inp.dtype)


@torch.library.custom_op("kc_kernels::chunked_soft_target", mutates_args=())
def chunked_soft_target(inp: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        scale: Optional[torch.Tensor], target_index: Optional[torch.Tensor],
                        target_value: Optional[torch.Tensor], teacher_logits: Optional[torch.Tensor],
                        sample_weight: Optional[torch.Tensor], teacher_x: Optional[torch.Tensor],
                        teacher_weight: Optional[torch.Tensor], teacher_bias: Optional[torch.Tensor],
                        segments: Optional[torch.Tensor], bounds: List[int], mode: str, reduction: str,
                        temperature: float, options: List[float], backend: str, memory_budget: int, needs: int
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of x [B, H] (or grouped) and weight [V, H], or of logits [B, V] when weight is None; with
    reduction "mean"/"sum" also the gradients of the inputs whose bit is set in ``needs`` (the backward only
    scales them). Outputs: (loss, the log-sum-exp of y per row and segment [B, G] (softmax-family modes; [B, 0]
    for sigmoid), four gradient slots: see _grad_slots)."""
    p = _problem(inp, weight, bias, scale, target_index, target_value, teacher_logits, sample_weight, teacher_x,
                 teacher_weight, teacher_bias, segments, bounds, mode, reduction, temperature, options)
    sweep = Sweep(p, _epilogue(backend), memory_budget)
    grads = None
    if needs and reduction != "none":
        loss_rows, grads = sweep.run(row_coef(p, sweep.device, sweep.state_dtype), _grad_names(p.x is not None, needs))
    else:
        loss_rows, _ = sweep.run(None)
        needs = 0
    loss = reduce_rows(loss_rows, p).to(_out_dtype(inp))
    return (loss, sweep.segment_lse().to(_out_dtype(inp))) + _grad_slots(inp, weight, bias, scale, needs, grads)


def _lse_shape(inp, segments, bounds, mode) -> Tuple[int, int]:
    from kc_kernels.loss_modes import LossMode

    G = len(bounds) - 1 if bounds else (1 if segments is None else segments.shape[0] - 1)
    return inp.shape[0], (G if LossMode.of(mode).terms.segment_lse else 0)


@chunked_soft_target.register_fake
def _chunked_soft_target_fake(inp, weight, bias, scale, target_index, target_value, teacher_logits, sample_weight,
                              teacher_x, teacher_weight, teacher_bias, segments, bounds, mode, reduction, temperature,
                              options, backend, memory_budget, needs):
    loss = inp.new_empty((inp.shape[0],) if reduction == "none" else (), dtype=_out_dtype(inp))
    lse = inp.new_empty(_lse_shape(inp, segments, bounds, mode), dtype=_out_dtype(inp))
    return (loss, lse) + _grad_slots(inp, weight, bias, scale, needs if reduction != "none" else 0, None)


@torch.library.custom_op("kc_kernels::chunked_soft_target_backward", mutates_args=())
def chunked_soft_target_backward(grad_loss: torch.Tensor, inp: torch.Tensor, weight: Optional[torch.Tensor],
                                 bias: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                                 target_index: Optional[torch.Tensor], target_value: Optional[torch.Tensor],
                                 teacher_logits: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor],
                                 teacher_x: Optional[torch.Tensor], teacher_weight: Optional[torch.Tensor],
                                 teacher_bias: Optional[torch.Tensor], segments: Optional[torch.Tensor],
                                 bounds: List[int], mode: str, reduction: str,
                                 temperature: float, options: List[float], backend: str, memory_budget: int,
                                 needs: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A second walk that makes the gradients, rows weighted by ``grad_loss``: reduction "none" (whose row
    weights are known only now), or a backward whose saved gradients were already used."""
    p = _problem(inp, weight, bias, scale, target_index, target_value, teacher_logits, sample_weight, teacher_x,
                 teacher_weight, teacher_bias, segments, bounds, mode, reduction, temperature, options)
    sweep = Sweep(p, _epilogue(backend), memory_budget)
    rows = grad_loss if reduction == "none" else None
    coef = row_coef(p, sweep.device, sweep.state_dtype, rows)
    if rows is None:
        coef = coef * grad_loss.to(coef.dtype)
    _, grads = sweep.run(coef, _grad_names(p.x is not None, needs))
    return _grad_slots(inp, weight, bias, scale, needs, grads)


@chunked_soft_target_backward.register_fake
def _chunked_soft_target_backward_fake(grad_loss, inp, weight, bias, scale, *rest):
    return _grad_slots(inp, weight, bias, scale, rest[-1], None)


_TENSOR_ARGS = 12  # inp .. teacher_bias, segments; then bounds, mode, reduction, temperature, options, backend,
# memory_budget, needs (reduction is the third option, needs the last: register_forward_made_grads reads them)
register_forward_made_grads(chunked_soft_target, chunked_soft_target_backward, _TENSOR_ARGS, GRAD_INPUTS,
                            side_outputs=1)


def _call(p, inp: torch.Tensor, weight, bias, backend: str, memory_budget: int):
    needs = needs_mask(inp, weight, bias, p.scale)
    target_index, target_value = p.target_index, p.target_value
    if p.hard_labels is not None:  # (see _problem)
        target_index, target_value = p.hard_labels[:, None], None
    out = chunked_soft_target(inp, weight, bias, p.scale, target_index, target_value, p.teacher_logits,
                              p.sample_weight, p.teacher_x, p.teacher_weight, p.teacher_bias, p.segments,
                              list(p.bounds or []), p.mode, p.reduction, float(p.temperature), _options(p), backend,
                              int(memory_budget), needs)
    return (out[0], out[1]) if p.want_lse else out[0]


def linear_soft_target_loss(p, backend: str) -> torch.Tensor:
    """The op on a validated problem, walked by ``backend``'s epilogue (its row in kc_kernels/dispatch.py)."""
    return _call(p, p.x, p.weight, p.bias, backend, p.memory_budget or 0)


def soft_target_loss(p, backend: str) -> torch.Tensor:
    return _call(p, p.logits, None, None, backend, p.memory_budget or 0)
