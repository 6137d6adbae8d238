"""Autograd of kc's custom ops whose forward makes the gradients (kc_kernels::chunked_soft_target,
kc_kernels::sampled_softmax): the backward scales them, or calls a backward op that makes them again."""
from __future__ import annotations

from typing import Optional

import torch


def eager(t: torch.Tensor) -> bool:
    """A real tensor outside any tracing: only then may the host read it or the saved gradients be scaled in
    place."""
    return not torch.compiler.is_compiling() and type(t) is torch.Tensor and not torch._is_functional_tensor(t)


def _scaled(grads, grad_loss: torch.Tensor):
    if not eager(grad_loss):
        return [g * grad_loss.to(g.dtype) for g in grads]
    # in place: a scaled copy would hold a second V x H weight gradient at the peak. On the CPU the usual
    # grad_loss of exactly 1 is skipped; on a GPU reading it would synchronise, so it is applied
    if grad_loss.device.type != "cpu" or float(grad_loss) != 1.0:
        for g in grads:
            g.mul_(grad_loss.to(g.dtype))
    return grads


def register_forward_made_grads(op, backward_op, tensor_args: int, grad_inputs: int, side_outputs: int = 0) -> None:
    """Autograd of a custom op whose outputs are (loss, ``side_outputs`` values without a gradient, one gradient
    per slot) and whose arguments are ``tensor_args`` tensors, then options ending with ``reduction``, backend, ...,
    ``needs`` (the gradient bitmask, last). For reduction "mean"/"sum" the forward made the gradients: backward only
    scales them by the scalar grad_output (once: a second backward, and reduction "none", call ``backward_op`` to
    make them again)."""
    first = 1 + side_outputs

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:tensor_args])
        ctx.options = inputs[tensor_args:]
        # the gradients made in the forward: not differentiable themselves, so holding them on ctx makes no cycle
        ctx.mark_non_differentiable(*output[1:])
        # no zero gradients made up for those outputs in backward: that was a [V, H] fill (and its page faults)
        # per step
        ctx.set_materialize_grads(False)
        ctx.grads = list(output[first:]) if inputs[-1] and inputs[tensor_args + 2] != "none" else None

    def backward(ctx, grad_loss, *unused):
        needs = ctx.options[-1]
        grads, ctx.grads = ctx.grads, None  # used once: a second backward (retain_graph) makes them again
        if grads is not None:
            grads = _scaled(grads, grad_loss)
        else:
            grads = backward_op(grad_loss, *ctx.saved_tensors, *ctx.options)
        result = [g if needs >> i & 1 else None for i, g in enumerate(grads)]
        return tuple(result) + (None,) * (tensor_args + len(ctx.options) - grad_inputs)

    op.register_autograd(backward, setup_context=setup_context)


def needs_mask(*tensors: Optional[torch.Tensor]) -> int:
    """The gradient bitmask of an op call: bit i set when tensors[i] needs a gradient (none without grad mode)."""
    if not torch.is_grad_enabled():
        return 0
    return sum(1 << i for i, t in enumerate(tensors) if t is not None and t.requires_grad)
