"""Plain-PyTorch definitions of kc's ops: the oracle every backend is tested against.

Everything here materialises the full [B, V] logits and favours clarity over speed. Inputs in fp16/bf16 are
upcast to fp32 for the math (fp64 inputs stay fp64, which is how tests get a float64 oracle); autograd carries
gradients back to the input dtypes. No argument checking happens here: kc_kernels.ops validates once, in front of
every backend (docs/ops.md states the semantics in prose).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from kc_kernels.layout import NORM_EPS  # added to a segment's sum of squares under a scale
from kc_kernels.reduction import compute_dtype, reduce_loss

__all__ = [
    "linear_logits",
    "soft_target_loss",
    "linear_soft_target_loss",
    "dense_targets",
    "sampled_logits",
    "sampled_softmax_loss",
    "reduce_loss",
]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return compute_dtype(t.dtype)


def segment_ids(segments: Optional[torch.Tensor], num_classes: int, device) -> torch.Tensor:
    """Segment index of every class, [V] int64 (all zeros when segments is None)."""
    if segments is None:
        return torch.zeros(num_classes, dtype=torch.long, device=device)
    sizes = segments[1:].to(device=device, dtype=torch.long) - segments[:-1].to(device=device, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)


def _segment_sum(values: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """[B, V] -> [B, G]: sum of each row over each segment's classes."""
    out = values.new_zeros(values.shape[0], num_segments)
    return out.index_add(1, seg, values)


def linear_logits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  segments: Optional[torch.Tensor] = None) -> torch.Tensor:
    """u[b, j] = <x_b, w_j> + bias_j; for grouped x [B, G, H], class j of segment g reads x[:, g, :]."""
    dt = _compute_dtype(x)
    w = weight.to(dt)
    if x.dim() == 2:
        u = x.to(dt) @ w.t()
    else:
        bounds = segments.tolist()
        u = torch.cat([x[:, g, :].to(dt) @ w[bounds[g]:bounds[g + 1]].t() for g in range(len(bounds) - 1)], dim=1)
    if bias is not None:
        u = u + bias.to(dt)
    return u


def dense_targets(num_classes: int, *, batch: int, target_index=None, target_value=None, teacher_logits=None,
                  mode: str = "sigmoid", segments=None, temperature: float = 1.0, dtype=torch.float32,
                  device=None) -> torch.Tensor:
    """The dense soft targets z [B, V] defined from either target form (docs/ops.md)."""
    if teacher_logits is not None:
        t = teacher_logits.to(dtype) / temperature
        if mode == "sigmoid":
            return torch.sigmoid(t)
        if segments is None:
            return torch.softmax(t, dim=1)
        bounds = segments.tolist()
        return torch.cat([torch.softmax(t[:, bounds[g]:bounds[g + 1]], dim=1) for g in range(len(bounds) - 1)], dim=1)
    z = torch.zeros(batch, num_classes, dtype=dtype, device=device)
    valid = (target_index >= 0) & (target_index < num_classes)  # unchecked out-of-range indices act as padding
    idx = torch.where(valid, target_index, torch.zeros_like(target_index)).long()
    val = torch.where(valid, target_value.to(dtype), torch.zeros((), dtype=dtype, device=z.device))
    return z.scatter_add(1, idx, val)  # duplicates add up


def soft_target_loss(logits: torch.Tensor, *, target_index=None, target_value=None, teacher_logits=None,
                     mode: str = "sigmoid", segments=None, scale=None, temperature: float = 1.0,
                     sample_weight=None, reduction: str = "mean", bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Soft-target loss of given raw scores u [B, V] (docs/ops.md).

    ``bias`` [V] is the class prior, added after the self-paced scale: y = gamma u / ||u||_seg + bias (then / T).
    The public soft_target_loss has no bias; linear_soft_target_loss passes its own here.
    """
    dt = _compute_dtype(logits)
    u = logits.to(dt)
    B, V = u.shape
    seg = segment_ids(segments, V, u.device)
    G = 1 if segments is None else len(segments) - 1
    if scale is not None:
        sq = _segment_sum(u * u, seg, G)  # [B, G]
        norm = torch.sqrt(sq + NORM_EPS)[:, seg]  # [B, V]
        gamma = scale.to(dt)
        gamma = gamma[seg] if gamma.numel() == G else gamma
        y = gamma * u / norm
    else:
        y = u
    if bias is not None:
        y = y + bias.to(dt)  # a class prior: never normalised together with x.w
    y = y / temperature
    z = dense_targets(V, batch=B, target_index=target_index, target_value=target_value,
                      teacher_logits=teacher_logits, mode=mode, segments=segments, temperature=temperature,
                      dtype=dt, device=u.device)
    if mode == "sigmoid":
        per_row = (F.softplus(y) - z * y).sum(dim=1)
    else:
        bounds = [0, V] if segments is None else segments.tolist()
        lse = torch.stack([torch.logsumexp(y[:, bounds[g]:bounds[g + 1]], dim=1) for g in range(G)], dim=1)
        mass = _segment_sum(z, seg, G)
        per_row = temperature ** 2 * ((mass * lse).sum(dim=1) - (z * y).sum(dim=1))
    return reduce_loss(per_row, sample_weight, reduction)


def linear_soft_target_loss(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                            target_index=None, target_value=None, teacher_logits=None, mode: str = "sigmoid",
                            segments=None, scale=None, temperature: float = 1.0, sample_weight=None,
                            reduction: str = "mean") -> torch.Tensor:
    """Fused linear + soft-target loss, defined by materialising the logits."""
    u = linear_logits(x, weight, None, segments)
    return soft_target_loss(u, target_index=target_index, target_value=target_value, teacher_logits=teacher_logits,
                            mode=mode, segments=segments, scale=scale, temperature=temperature,
                            sample_weight=sample_weight, reduction=reduction, bias=bias)


# ----------------------------------------------------------------------------------------------- sampled softmax

def sampled_logits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                   sampled: Tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, remove_accidental_hits: bool = True,
                   subtract_log_q: bool = True, accidental_hits: str = "all") -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, T + S] and targets [B, T + S] of TensorFlow's sampled softmax.

    labels is [B, T] with -1 padding; sampled = (ids [S], true_expected [B, T], sampled_expected [S]). Padded
    labels and accidental hits get a logit of -inf (they drop out of the softmax); each valid true label has
    target 1 / num_true. An accidental hit is every sampled position holding one of the row's labels
    (accidental_hits="all"), or only the last position of each such id ("tensorflow": TensorFlow's lookup keeps one
    position per id, so with repeated draws the other copies stay in the softmax). Values the op front refuses but
    a direct call of the custom op can pass are masked, never read: a label outside [0, V) is padding, a sampled id
    outside [0, V) a column of logit -inf (no gradient).
    """
    dt = _compute_dtype(x)
    ids, true_expected, sampled_expected = sampled
    V = weight.shape[0]
    valid = (labels >= 0) & (labels < V)
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    ids = ids.long()
    ids_ok = (ids >= 0) & (ids < V)
    ids_safe = torch.where(ids_ok, ids, torch.zeros_like(ids))
    xf, wf = x.to(dt), weight.to(dt)
    true_w = wf[safe]  # [B, T, H]
    true_logits = torch.einsum("bh,bth->bt", xf, true_w)
    samp_logits = xf @ wf[ids_safe].t()  # [B, S]
    if bias is not None:
        bf = bias.to(dt)
        true_logits = true_logits + bf[safe]
        samp_logits = samp_logits + bf[ids_safe]
    if subtract_log_q:
        true_logits = true_logits - torch.log(true_expected.to(dt))
        samp_logits = samp_logits - torch.log(sampled_expected.to(dt))
    neg_inf = torch.tensor(-math.inf, dtype=dt, device=x.device)
    true_logits = torch.where(valid, true_logits, neg_inf)
    samp_logits = torch.where(ids_ok[None, :], samp_logits, neg_inf)
    if remove_accidental_hits:
        hit = ((labels.long()[:, :, None] == ids[None, None, :]) & valid[:, :, None]).any(dim=1)  # [B, S]
        if accidental_hits == "tensorflow":
            later = torch.triu(ids[:, None] == ids[None, :], diagonal=1)  # [S, S]: the same id drawn later
            hit = hit & ~later.any(dim=1)[None, :]
        samp_logits = torch.where(hit, neg_inf, samp_logits)
    num_true = valid.sum(dim=1, keepdim=True).clamp(min=1).to(dt)  # a row without a valid label: targets all 0
    targets = torch.cat([valid.to(dt) / num_true, torch.zeros_like(samp_logits)], dim=1)
    return torch.cat([true_logits, samp_logits], dim=1), targets


def sampled_softmax_loss(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                         *, sampled: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                         remove_accidental_hits: bool = True, subtract_log_q: bool = True,
                         sample_weight: Optional[torch.Tensor] = None, reduction: str = "mean",
                         accidental_hits: str = "all") -> torch.Tensor:
    """Sampled softmax cross-entropy with fixed samples (the op front draws them when not given).

    labels [B] or [B, T]; true_expected has the same shape as labels.
    """
    if labels.dim() == 1:
        labels = labels[:, None]
        sampled = (sampled[0], sampled[1].reshape(-1, 1), sampled[2])
    logits, targets = sampled_logits(x, weight, bias, labels, sampled, remove_accidental_hits=remove_accidental_hits,
                                     subtract_log_q=subtract_log_q, accidental_hits=accidental_hits)
    lse = torch.logsumexp(logits, dim=1)
    # targets are 0 wherever a logit is -inf, so mask before the product to keep 0 * -inf out of the sum
    picked = torch.where(targets > 0, logits, torch.zeros_like(logits))
    per_row = lse - (targets * picked).sum(dim=1)
    return reduce_loss(per_row, sample_weight, reduction)
