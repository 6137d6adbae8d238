"""The ``reference`` backend: the definitions in kc_kernels.reference, called on a validated problem."""
from kc_kernels import reference


def linear_soft_target_loss(p):
    return reference.linear_soft_target_loss(p.x, p.weight, p.bias, **p.loss_kwargs())


def soft_target_loss(p):
    return reference.soft_target_loss(p.logits, **p.loss_kwargs())


def sampled_softmax_loss(p):
    return reference.sampled_softmax_loss(p.x, p.weight, p.bias, p.labels, sampled=p.sampled,
                                          remove_accidental_hits=p.remove_accidental_hits,
                                          subtract_log_q=p.subtract_log_q, sample_weight=p.sample_weight,
                                          reduction=p.reduction)
