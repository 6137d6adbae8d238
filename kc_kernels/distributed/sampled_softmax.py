"""``vocab_parallel_sampled_softmax_loss``: TensorFlow's sampled softmax with the classes sharded across ranks."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from kc_kernels.distributed.accounting import record
from kc_kernels.distributed.collectives import all_reduce, copy_to_ranks, gather_ranges, rank, sum_over_ranks, world
from kc_kernels.distributed.sharding import check_tiling
from kc_kernels.ops.checks import fail
from kc_kernels.reduction import compute_dtype, reduce_loss

__all__ = ["vocab_parallel_sampled_softmax_loss"]


def _shared_candidates(num_sampled: int, num_classes: int, sampler: str, unique: bool, class_counts, distortion,
                       generator, device, group):
    """Rank 0 draws the candidates; the ids and the try count are broadcast, so every rank holds the same ones."""
    from kc_kernels import samplers

    src = dist.get_global_rank(group, 0) if group is not None and world(group) > 1 else 0
    me = rank(group)
    cand = None
    if me == 0:
        cand = samplers.sample_candidates(sampler, num_sampled, num_classes, unique=unique, class_counts=class_counts,
                                          distortion=distortion, generator=generator)
        packed = torch.cat([torch.tensor([cand.num_tries]), cand.ids.long()])
    else:
        packed = torch.empty(num_sampled + 1, dtype=torch.long)
    packed = packed.to(device)
    record("sampled_ids", packed)
    if world(group) > 1:
        dist.broadcast(packed, src, group=group)
    if cand is None:
        probs = (samplers.class_probabilities(sampler, num_classes, class_counts=class_counts, distortion=distortion)
                 if sampler == "unigram" else None)
        cand = samplers.Candidates(packed[1:].cpu(), int(packed[0]), probs, sampler, num_classes)
    return cand


def vocab_parallel_sampled_softmax_loss(
        x: torch.Tensor, weight_shard: torch.Tensor, bias_shard: Optional[torch.Tensor], labels: torch.Tensor, *,
        class_range: Tuple[int, int], num_classes: int, num_sampled: Optional[int] = None,
        sampler: str = "log_uniform", class_counts: Optional[torch.Tensor] = None, distortion: float = 1.0,
        unique: bool = True, remove_accidental_hits: bool = True, subtract_log_q: bool = True,
        generator: Optional[torch.Generator] = None, sampled=None, sample_weight: Optional[torch.Tensor] = None,
        reduction: str = "mean", group=None) -> torch.Tensor:
    """``sampled_softmax_loss`` with the classes sharded over the ranks of ``group`` (TensorFlow's semantics).

    This rank holds classes ``class_range = (lo, hi)``: ``weight_shard`` [hi - lo, H], ``bias_shard``. Replicated:
    x [B, H], ``labels`` [B] or [B, T] (global ids, -1 pads), ``sample_weight``, ``class_counts`` [V] (unigram).
    The S negatives are shared by the ranks: drawn by rank 0 with its ``generator`` and broadcast (S + 1 int64),
    or given as ``sampled=(ids, true_expected, sampled_expected)``, which must then be the same on every rank.
    Each rank scores the true labels and the negatives it owns ([B, T + S_r] logits, S_r about S / W); the
    softmax's log-sum-exp is merged across ranks (an all-reduce of the row maxima, then of [B, 2]: the sum of
    exponentials and the true labels' target-weighted logits). Backward all-reduces dx; weight and bias gradients
    stay on the shard (dense). Returns the global loss, the same on every rank.
    """
    from kc_kernels.ops import checks

    lo, hi = (int(v) for v in class_range)
    V = int(num_classes)
    checks.tensor("x", x, dims=(2,), floating=True)
    if not (0 <= lo < hi <= V):
        fail("class_range", f"({lo}, {hi}) is not a non-empty range inside [0, {V})")
    if weight_shard.dim() != 2 or tuple(weight_shard.shape) != (hi - lo, x.shape[1]):
        fail("weight_shard", f"must be [{hi - lo}, {x.shape[1]}] for class_range ({lo}, {hi}), got "
                              f"{tuple(weight_shard.shape)}")
    if bias_shard is not None and tuple(bias_shard.shape) != (hi - lo,):
        fail("bias_shard", f"must be [{hi - lo}], got {tuple(bias_shard.shape)}")
    checks.tensor("labels", labels, dims=(1, 2), integer=True)
    if labels.shape[0] != x.shape[0]:
        fail("labels", f"has {labels.shape[0]} rows but x has {x.shape[0]}")
    checks.index_range("labels", labels, V)
    labels2 = (labels if labels.dim() == 2 else labels[:, None]).long()
    valid = labels2 >= 0
    if labels2.numel() and bool((valid.sum(dim=1) == 0).any()):
        fail("labels", "every row needs at least one label (a row is all -1 padding)")
    if reduction not in ("none", "sum", "mean"):
        fail("reduction", f"must be 'none', 'sum' or 'mean', got {reduction!r}")
    if sample_weight is not None and tuple(sample_weight.shape) != (x.shape[0],):
        fail("sample_weight", f"must be [{x.shape[0]}], got {tuple(sample_weight.shape)}")
    ranges = gather_ranges(lo, hi, x.device, group)
    check_tiling(ranges, V)
    if sampled is None:
        if num_sampled is None or isinstance(num_sampled, bool) or int(num_sampled) != num_sampled \
                or num_sampled < 1:
            fail("num_sampled", f"must be a positive integer, got {num_sampled!r}")
        if unique and num_sampled > V:
            fail("num_sampled", f"{num_sampled} exceeds the {V} classes (unique sampling)")
        cc = None if class_counts is None else class_counts.cpu()
        if sampler == "unigram" and cc is None:
            fail("class_counts", "the unigram sampler needs class_counts [V]")
        cand = _shared_candidates(int(num_sampled), V, sampler, unique, cc, distortion, generator, x.device, group)
        ids = cand.ids.to(x.device)
        true_expected = cand.expected_count(labels2.cpu(), int(num_sampled), unique).to(x.device)
        sampled_expected = cand.expected_count(cand.ids, int(num_sampled), unique).to(x.device)
        if subtract_log_q and bool(((true_expected <= 0) & valid).any()):
            fail("labels", "hold a class that the unigram sampler can never draw (class_counts 0)")
    else:
        if not isinstance(sampled, (tuple, list)) or len(sampled) != 3:
            fail("sampled", "expected a tuple (ids [S], true_expected, sampled_expected [S])")
        ids, true_expected, sampled_expected = sampled
        if ids.dim() != 1 or tuple(sampled_expected.shape) != tuple(ids.shape):
            fail("sampled", "ids and sampled_expected must both be [S]")
        if tuple(true_expected.shape) != tuple(labels.shape):
            fail("sampled", f"true_expected has shape {tuple(true_expected.shape)}, labels {tuple(labels.shape)}")
        checks.index_range("sampled", ids, V, allow_padding=False)
        ids = ids.long()
        true_expected = true_expected.reshape(labels2.shape)

    dt = compute_dtype(x.dtype)
    x_all = copy_to_ranks(x, group, "grad_x").to(dt)
    w = weight_shard.to(dt)
    b = None if bias_shard is None else bias_shard.to(dt)
    neg_inf = torch.tensor(-math.inf, dtype=dt, device=x.device)
    # the true labels this rank owns
    mine_t = valid & (labels2 >= lo) & (labels2 < hi)
    local_t = torch.where(mine_t, labels2 - lo, 0)
    true_logits = torch.einsum("bh,bth->bt", x_all, w[local_t])
    if b is not None:
        true_logits = true_logits + b[local_t]
    if subtract_log_q:
        true_logits = true_logits - torch.log(torch.where(valid, true_expected.to(dt), 1.0))
    true_logits = torch.where(mine_t, true_logits, neg_inf)
    # the negatives this rank owns
    own = (ids >= lo) & (ids < hi)
    my_ids = ids[own]
    samp_logits = x_all @ w[my_ids - lo].t()
    if b is not None:
        samp_logits = samp_logits + b[my_ids - lo]
    if subtract_log_q:
        samp_logits = samp_logits - torch.log(sampled_expected[own].to(dt))
    if remove_accidental_hits:
        hit = ((labels2[:, :, None] == my_ids[None, None, :]) & valid[:, :, None]).any(dim=1)
        samp_logits = torch.where(hit, neg_inf, samp_logits)
    logits = torch.cat([true_logits, samp_logits], dim=1)
    local_max = logits.detach().max(dim=1).values if logits.shape[1] else torch.full_like(x_all[:, 0], -math.inf)
    row_max = all_reduce("max", local_max.detach().clone(), group, op=dist.ReduceOp.MAX)
    target = valid.to(dt) / valid.sum(dim=1, keepdim=True).to(dt)
    picked = (target * torch.where(mine_t, true_logits, torch.zeros((), dtype=dt, device=x.device))).sum(dim=1)
    sum_exp = torch.exp(logits - row_max[:, None]).sum(dim=1)
    both = sum_over_ranks(torch.stack([sum_exp, picked], dim=1), group, "sum_exp_and_true")
    per_row = row_max + torch.log(both[:, 0]) - both[:, 1]
    return reduce_loss(per_row, sample_weight, reduction)
