"""The ``reference`` backend: the definitions in kc_kernels.reference, called on a validated problem (the backend
name is the table's calling convention: kc_kernels/dispatch.py)."""
import torch

from kc_kernels import reference


def linear_soft_target_loss(p, backend: str = "reference"):
    loss = reference.linear_soft_target_loss(p.x, p.weight, p.bias, **p.loss_kwargs())
    if not p.want_lse:
        return loss
    with torch.no_grad():  # (loss, lse [B, G]) as the chunked op returns them
        y = reference.linear_logits(p.x, p.weight, None, p.segments)
        if p.bias is not None:
            y = y + p.bias.to(y.dtype)
        if p.softcap is not None:
            y = p.softcap * torch.tanh(y / p.softcap)
        y = y / p.temperature
        bounds = p.bounds if p.bounds is not None else p.segments.tolist()
        lse = torch.stack([torch.logsumexp(y[:, a:b], dim=1) for a, b in zip(bounds[:-1], bounds[1:])], dim=1)
    return loss, lse


def soft_target_loss(p, backend: str = "reference") -> torch.Tensor:
    return reference.soft_target_loss(p.logits, **p.loss_kwargs())


def sampled_softmax_loss(p, backend: str = "reference") -> torch.Tensor:
    return reference.sampled_softmax_loss(p.x, p.weight, p.bias, p.labels, sampled=p.sampled,
                                          remove_accidental_hits=p.remove_accidental_hits,
                                          accidental_hits=p.accidental_hits,
                                          subtract_log_q=p.subtract_log_q, sample_weight=p.sample_weight,
                                          reduction=p.reduction)
