"""The ``reference`` backend: the definitions in kc_kernels.reference, called on a validated problem (the backend
name is the table's calling convention: kc_kernels/dispatch.py)."""
import torch

from kc_kernels import reference


def linear_soft_target_loss(p, backend: str = "reference") -> torch.Tensor:
    return reference.linear_soft_target_loss(p.x, p.weight, p.bias, **p.loss_kwargs())


def soft_target_loss(p, backend: str = "reference") -> torch.Tensor:
    return reference.soft_target_loss(p.logits, **p.loss_kwargs())


def sampled_softmax_loss(p, backend: str = "reference") -> torch.Tensor:
    return reference.sampled_softmax_loss(p.x, p.weight, p.bias, p.labels, sampled=p.sampled,
                                          remove_accidental_hits=p.remove_accidental_hits,
                                          accidental_hits=p.accidental_hits,
                                          subtract_log_q=p.subtract_log_q, sample_weight=p.sample_weight,
                                          reduction=p.reduction)
