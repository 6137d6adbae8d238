"""Plain-PyTorch definitions of kc's ops: the oracle every backend is tested against.

Everything here materialises the full [B, V] logits and favours clarity over speed. Inputs in fp16/bf16 are
upcast to fp32 for the math (fp64 inputs stay fp64, which is how tests get a float64 oracle); autograd carries
gradients back to the input dtypes. No argument checking happens here: kc_kernels.ops validates once, in front of
every backend (docs/ops.md states the semantics in prose).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from kc_kernels.layout import NORM_EPS  # added to a segment's sum of squares under a scale
from kc_kernels.reduction import compute_dtype, reduce_loss

__all__ = [
    "linear_logits",
    "soft_target_loss",
    "linear_soft_target_loss",
    "cross_entropy_loss",
    "linear_cross_entropy",
    "dense_targets",
    "teacher_log_probs",
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


TAIL_MIN = 1e-6  # the least probability mass a sparse teacher leaves outside its top K (reverse KL, JSD)


def _segment_log_softmax(y: torch.Tensor, segments) -> torch.Tensor:
    if segments is None:
        return torch.log_softmax(y, dim=1)
    bounds = segments.tolist()
    return torch.cat([torch.log_softmax(y[:, bounds[g]:bounds[g + 1]], dim=1) for g in range(len(bounds) - 1)], dim=1)


def teacher_log_probs(num_classes: int, *, batch: int, target_index=None, target_value=None, teacher_logits=None,
                      segments=None, temperature: float = 1.0, dtype=torch.float32, device=None) -> torch.Tensor:
    """log z [B, V]: the teacher's distribution per segment as the reverse KL and the JSD read it.

    A dense teacher: log_softmax(t / T) per segment. Sparse top-K probabilities (duplicates add up): a class with a
    positive value keeps it; the rest of the segment shares the residual mass max(1 - sum of the values, TAIL_MIN)
    evenly; the segment is then normalised to 1. (Forward KL and cross-entropy need no teacher probability outside
    the top K, since 0 log 0 = 0, and read the values as given: dense_targets.)
    """
    if teacher_logits is not None:
        return _segment_log_softmax(teacher_logits.to(dtype) / temperature, segments)
    z = dense_targets(num_classes, batch=batch, target_index=target_index, target_value=target_value,
                      dtype=dtype, device=device)
    seg = segment_ids(segments, num_classes, z.device)
    G = 1 if segments is None else len(segments) - 1
    given = z > 0
    mass = _segment_sum(z, seg, G)
    outside = _segment_sum((~given).to(dtype), seg, G)
    tail = (1 - mass).clamp(min=TAIL_MIN) / outside.clamp(min=1)
    full = torch.where(given, z, tail[:, seg])
    total = _segment_sum(full, seg, G)
    return torch.log(full) - torch.log(total)[:, seg]


def _divergence(y: torch.Tensor, lz: torch.Tensor, mode: str, beta: float, segments) -> torch.Tensor:
    """Per-row sum over classes of the divergence between the student's softmax of y and the teacher's log z."""
    lp = _segment_log_softmax(y, segments)
    p = torch.exp(lp)
    if mode == "reverse_kl":
        return (p * (lp - lz)).sum(dim=1)
    z = torch.exp(lz)
    lm = torch.logaddexp(lz + math.log(beta), lp + math.log(1 - beta))
    t_part = torch.where(z > 0, z * (lz - lm), torch.zeros_like(z))
    s_part = torch.where(p > 0, p * (lp - lm), torch.zeros_like(p))
    return (beta * t_part + (1 - beta) * s_part).sum(dim=1)


def soft_target_loss(logits: torch.Tensor, *, target_index=None, target_value=None, teacher_logits=None,
                     mode: str = "sigmoid", segments=None, scale=None, temperature: float = 1.0,
                     sample_weight=None, reduction: str = "mean", bias: Optional[torch.Tensor] = None,
                     beta: float = 0.5, softcap: Optional[float] = None, z_loss: float = 0.0,
                     uniform_target: float = 0.0) -> torch.Tensor:
    """Soft-target loss of given raw scores u [B, V] (docs/ops.md).

    ``bias`` [V] is the class prior, added after the self-paced scale: y = gamma u / ||u||_seg + bias (then / T).
    The public soft_target_loss has no bias; linear_soft_target_loss passes its own here.
    Modes: "sigmoid"; "softmax" (cross-entropy against the targets, times T^2); "kl" (KL(z || p): the softmax's loss
    plus sum z log z); "reverse_kl" (KL(p || z)) and "jsd" (beta KL(z || M) + (1 - beta) KL(p || M) with
    M = beta z + (1 - beta) p; beta 0 is "kl", beta 1 "reverse_kl"), all per segment and times T^2.
    The options linear_cross_entropy builds on (softmax and kl, no scale): ``softcap`` (y = softcap tanh((u + bias) /
    softcap) / T), ``z_loss`` (adds z_loss lse^2 per segment, lse of y) and ``uniform_target`` (added to every
    class's target: label smoothing's eps / V).
    """
    if mode == "jsd" and beta in (0.0, 1.0):
        mode = "kl" if beta == 0.0 else "reverse_kl"
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
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    y = y / temperature
    if mode in ("reverse_kl", "jsd"):
        lz = teacher_log_probs(V, batch=B, target_index=target_index, target_value=target_value,
                               teacher_logits=teacher_logits, segments=segments, temperature=temperature, dtype=dt,
                               device=u.device)
        per_row = temperature ** 2 * _divergence(y, lz, mode, beta, segments)
        return reduce_loss(per_row, sample_weight, reduction)
    z = dense_targets(V, batch=B, target_index=target_index, target_value=target_value,
                      teacher_logits=teacher_logits, mode=mode, segments=segments, temperature=temperature,
                      dtype=dt, device=u.device)
    if uniform_target:
        z = z + uniform_target
    if mode == "sigmoid":
        per_row = (F.softplus(y) - z * y).sum(dim=1)
    else:
        bounds = [0, V] if segments is None else segments.tolist()
        lse = torch.stack([torch.logsumexp(y[:, bounds[g]:bounds[g + 1]], dim=1) for g in range(G)], dim=1)
        mass = _segment_sum(z, seg, G)
        per_row = temperature ** 2 * ((mass * lse).sum(dim=1) - (z * y).sum(dim=1))
        if mode == "kl":
            zlz = torch.where(z > 0, z * torch.log(torch.where(z > 0, z, torch.ones_like(z))), torch.zeros_like(z))
            per_row = per_row + temperature ** 2 * zlz.sum(dim=1)
        if z_loss:
            per_row = per_row + z_loss * (lse * lse).sum(dim=1)
    return reduce_loss(per_row, sample_weight, reduction)


def teacher_head_logits(teacher_x: torch.Tensor, teacher_weight: torch.Tensor,
                        teacher_bias: Optional[torch.Tensor] = None, segments=None, dtype=None) -> torch.Tensor:
    """The teacher's logits from its last hidden states and head (no gradient reaches the teacher)."""
    with torch.no_grad():
        t = linear_logits(teacher_x, teacher_weight, teacher_bias, segments)
    return t if dtype is None else t.to(dtype)


def linear_soft_target_loss(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                            target_index=None, target_value=None, teacher_logits=None, teacher_x=None,
                            teacher_weight=None, teacher_bias=None, mode: str = "sigmoid", beta: float = 0.5,
                            segments=None, scale=None, temperature: float = 1.0, sample_weight=None,
                            reduction: str = "mean", **options) -> torch.Tensor:
    """Fused linear + soft-target loss, defined by materialising the logits (and a teacher head's logits).
    ``options``: soft_target_loss's softcap, z_loss, uniform_target."""
    u = linear_logits(x, weight, None, segments)
    if teacher_x is not None:
        teacher_logits = teacher_head_logits(teacher_x, teacher_weight, teacher_bias, segments)
    return soft_target_loss(u, target_index=target_index, target_value=target_value, teacher_logits=teacher_logits,
                            mode=mode, segments=segments, scale=scale, temperature=temperature,
                            sample_weight=sample_weight, reduction=reduction, bias=bias, beta=beta, **options)


# ------------------------------------------------------------------------------------------ hard-label cross-entropy

def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                       label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                       reduction: str = "mean", sample_weight=None, return_z_loss: bool = False,
                       return_lse: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Hard-label cross-entropy of logits [B, V] with the extras LLM training uses (docs/ops.md).

    y = softcap tanh(logits / softcap) when softcap is given; per row, with lse = logsumexp(y):
    (1 - eps) (lse - y[label]) + eps (lse - mean_j y_j) + z_loss lse^2, eps = label_smoothing. A row whose label
    is ignore_index contributes 0 and is not counted: "mean" divides by the weight (or number) of counted rows, and
    gives 0 when there is none. Returns the loss, then the z-loss part of it (reduced alike) if return_z_loss, then
    lse [B] if return_lse.
    """
    dt = _compute_dtype(logits)
    y = logits.to(dt)
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    lse = torch.logsumexp(y, dim=1)
    valid = labels != ignore_index
    lab = torch.where(valid, labels, torch.zeros_like(labels)).long()
    nll = lse - y.gather(1, lab[:, None])[:, 0]
    per_row = (1 - label_smoothing) * nll
    if label_smoothing:
        per_row = per_row + label_smoothing * (lse - y.mean(dim=1))
    zl = z_loss * lse * lse
    zero = torch.zeros((), dtype=dt, device=y.device)
    per_row = torch.where(valid, per_row + zl, zero)
    w = valid.to(dt) if sample_weight is None else torch.where(valid, sample_weight.to(dt), zero)
    out = [_reduce_counted(per_row, w, reduction)]
    if return_z_loss:
        out.append(_reduce_counted(torch.where(valid, zl, zero), w, reduction))
    if return_lse:
        out.append(lse)
    return out[0] if len(out) == 1 else tuple(out)


def _reduce_counted(per_row: torch.Tensor, w: torch.Tensor, reduction: str) -> torch.Tensor:
    """Weighted per-row values: "none" keeps them (times the weight), "sum" sums, "mean" divides by the counted
    weight (0 when nothing is counted)."""
    if reduction == "none":
        return per_row * w
    total = (per_row * w).sum()
    if reduction == "sum":
        return total
    n = w.sum()
    return torch.where(n > 0, total / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(total))


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                         labels: torch.Tensor, **kwargs) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Fused linear + hard-label cross-entropy, defined by materialising the logits (see cross_entropy_loss)."""
    return cross_entropy_loss(linear_logits(x, weight, bias), labels, **kwargs)


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
