"""Public front of the fused linear + hard-label cross-entropy with the options LLM training uses (ignore_index,
label smoothing, z-loss, logit soft-capping, per-row log-sum-exps): argument checks once, then the soft-target op
in softmax mode (docs/ops.md, "linear_cross_entropy"). The definition is kc_kernels.reference.cross_entropy_loss.

The labels become one sparse target of value 1 - label_smoothing per row (an ignored row: padding, weight 0), the
smoothing a uniform target eps / V on every class, and "mean" a sample weight 1 / (rows counted), so one walk over
the classes makes the loss and every gradient.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from kc_kernels.ops import amp, checks
from kc_kernels.ops.soft_target import REDUCTIONS, SoftTargetProblem, _check_budget, _dispatch

Result = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


def _number(name: str, v, lo: float, hi: float, hi_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= float(v) <= hi) or (
            hi_open and float(v) == hi):
        checks.fail(name, f"must be a number in [{lo}, {hi}{')' if hi_open else ']'}, got {v!r}")
    return float(v)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         labels: Optional[torch.Tensor] = None, *, ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                         reduction: str = "mean", sample_weight: Optional[torch.Tensor] = None,
                         return_z_loss: bool = False, return_lse: bool = False, backend: str = "auto",
                         memory_budget: Optional[int] = None) -> Result:
    """Cross-entropy of the logits ``x @ weight.T + bias`` against hard labels, without materialising them.

    x [..., H], weight [V, H], bias [V], labels [...] (int, in [0, V) or ignore_index). Per row, with
    y = softcap tanh(logits / softcap) (when softcap is given) and lse = logsumexp(y):
    (1 - eps) (lse - y[label]) + eps (lse - mean_j y_j) + z_loss lse^2, eps = label_smoothing. Rows whose label is
    ignore_index contribute 0 and are not counted: "mean" divides by the rows counted (their sample weights when
    given) and is 0 when none is; "none" gives the per-row losses in the labels' shape (0 where ignored).
    Returns the loss; with return_z_loss also the z-loss part of it (reduced alike, no gradient); with return_lse
    also lse in the labels' shape (no gradient), in that order. Returns fp32 (fp64 for fp64 input).
    """
    checks.tensor("x", x, dims=None, floating=True)
    if x.dim() < 1:
        checks.fail("x", "must have at least one dimension (the features)")
    if labels is None:
        checks.fail("labels", "is required (one class index per row of x)")
    checks.tensor("labels", labels, integer=True)
    checks.same_device("labels", labels, x, "x")
    if tuple(labels.shape) != tuple(x.shape[:-1]):
        checks.fail("labels", f"shape {tuple(labels.shape)} differs from x's rows {tuple(x.shape[:-1])}")
    lead = tuple(labels.shape)
    x2 = x.reshape(-1, x.shape[-1])
    lab = labels.reshape(-1)
    x2, weight, bias = amp.cast_inputs(x.device.type, x2, weight, bias)
    V = checks.linear_weights(x2, weight, bias)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        checks.fail("ignore_index", f"must be an int, got {ignore_index!r}")
    if 0 <= ignore_index < V:
        checks.fail("ignore_index", f"{ignore_index} is a class (0 <= ignore_index < {V}); use a negative value")
    eps = _number("label_smoothing", label_smoothing, 0.0, 1.0, hi_open=True)
    zl = _number("z_loss", z_loss, 0.0, float("inf"), hi_open=True)
    if softcap is not None:
        softcap = checks.positive_number("softcap", softcap)
    reduction = checks.choice("reduction", reduction, REDUCTIONS)
    B = x2.shape[0]
    valid = lab != ignore_index
    values = checks.values_mode(x.device)
    if values == "sync" and bool((valid & ((lab < 0) | (lab >= V))).any()):
        bad = lab[valid & ((lab < 0) | (lab >= V))][0].item()
        checks.fail("labels", f"holds {bad}, neither a class in [0, {V}) nor ignore_index={ignore_index}")
    if values == "async":
        checks.assert_later("labels", (~valid | ((lab >= 0) & (lab < V))).all(),
                            f"holds a value outside [0, {V}) that is not ignore_index (a device-side check failed)")
    cdt = torch.float64 if x2.dtype == torch.float64 else torch.float32
    w = valid.to(cdt)
    if sample_weight is not None:
        checks.tensor("sample_weight", sample_weight, floating=True)
        checks.same_device("sample_weight", sample_weight, x, "x")
        checks.shape("sample_weight", sample_weight, lead, "one weight per label")
        if values == "sync" and bool(torch.isnan(sample_weight).any()):
            checks.fail("sample_weight", "contains NaN")
        w = w * sample_weight.detach().reshape(-1).to(cdt)
    if reduction == "mean":
        n = w.sum()
        w = torch.where(n > 0, w / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(w))
    p = SoftTargetProblem(batch=B, num_classes=V, mode="softmax", reduction="none" if reduction == "none" else "sum",
                          temperature=1.0, x=x2, weight=weight, bias=bias)
    p.target_index = torch.where(valid, lab, torch.full_like(lab, -1)).long()[:, None]
    p.target_value = torch.full((B, 1), 1.0 - eps, dtype=cdt, device=x.device)
    p.bounds = [0, V]
    p.sample_weight = w
    p.softcap, p.z_loss, p.uniform_target = softcap, zl, eps / V
    p.memory_budget = _check_budget(memory_budget)
    p.want_lse = bool(return_lse or return_z_loss)
    out = _dispatch("linear_soft_target_loss", p, backend, x.device)
    loss, lse = (out[0], out[1][:, 0].detach()) if p.want_lse else (out, None)
    if reduction == "none":
        loss = loss.reshape(lead)
    results = [loss]
    if return_z_loss:
        assert lse is not None
        zrows = zl * lse * lse * w.to(lse.dtype)
        results.append(zrows.reshape(lead) if reduction == "none" else zrows.sum())
    if return_lse:
        assert lse is not None
        results.append(lse.reshape(lead))
    return results[0] if len(results) == 1 else tuple(results)
