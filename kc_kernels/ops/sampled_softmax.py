"""Public front of sampled softmax: checks, candidate sampling, backend dispatch.

Semantics follow TensorFlow's tf.nn.sampled_softmax_loss (see kc_kernels/samplers.py and reference.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from kc_kernels import dispatch, samplers
from kc_kernels.ops import amp, checks
from kc_kernels.ops import sampled_softmax_autograd as _op  # also defines kc_kernels::sampled_softmax
from kc_kernels.ops.soft_target import REDUCTIONS


@dataclass
class SampledSoftmaxProblem:
    x: torch.Tensor  # [B, H]
    weight: torch.Tensor  # [V, H]
    bias: Optional[torch.Tensor]  # [V]
    labels: torch.Tensor  # [B] or [B, T], -1 = padding
    sampled: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids [S] int64, true_expected (labels' shape), [S]
    remove_accidental_hits: bool
    subtract_log_q: bool
    reduction: str
    sample_weight: Optional[torch.Tensor] = None
    sparse_grad: bool = False  # weight/bias gradients as sparse COO rows
    accidental_hits: str = "all"  # which copies of a drawn label remove_accidental_hits masks: "all", "tensorflow"


def _check_sampled(sampled, labels: torch.Tensor, num_classes: int, x: torch.Tensor):
    if not isinstance(sampled, (tuple, list)) or len(sampled) != 3:
        checks.fail("sampled", "expected a tuple (ids [S], true_expected, sampled_expected [S])")
    ids, true_expected, sampled_expected = sampled
    checks.tensor("sampled", ids, dims=(1,), integer=True)
    checks.tensor("sampled", true_expected, floating=True)
    checks.tensor("sampled", sampled_expected, dims=(1,), floating=True)
    for t in sampled:
        checks.same_device("sampled", t, x, "x")
    if len(ids) == 0:
        checks.fail("sampled", "ids is empty")
    values = _values(x)
    if values == "sync":
        checks.index_range("sampled", ids, num_classes, allow_padding=False)
    elif values == "async":
        checks.index_range_later("sampled", ids, num_classes, allow_padding=False)
    if tuple(true_expected.shape) != tuple(labels.shape):
        checks.fail("sampled", f"true_expected has shape {tuple(true_expected.shape)}, labels {tuple(labels.shape)}")
    if tuple(sampled_expected.shape) != tuple(ids.shape):
        checks.fail("sampled", f"sampled_expected has shape {tuple(sampled_expected.shape)}, ids {tuple(ids.shape)}")
    if values == "sync":
        valid = labels >= 0
        if bool((true_expected[valid] <= 0).any()) or bool((sampled_expected <= 0).any()):
            checks.fail("sampled", "expected counts must be > 0")
    elif values == "async":
        ok = ((true_expected > 0) | (labels < 0)).all() & (sampled_expected > 0).all()
        checks.assert_later("sampled", ok, "expected counts must be > 0 (a device-side check failed)")
    return ids.long(), true_expected, sampled_expected


_NEVER_DRAWN = "hold a class that the unigram sampler can never draw (class_counts 0)"  # log(0): a +inf logit


def _draw_in_graph(sampler, num_sampled, V, generator, unique, class_counts, distortion, labels, subtract_log_q, x):
    """Candidates and expected counts drawn on x's device from the caller's PhiloxGenerator (no host read, so
    torch.compile keeps the draw in the step's graph)."""
    if generator.device != x.device:
        checks.fail("generator", f"state is on {generator.device}, x on {x.device}: draws run on x's device")
    cand = samplers.draw_in_graph(sampler, num_sampled, V, generator, unique=unique, class_counts=class_counts,
                                  distortion=distortion)
    true_expected = cand.expected_count(labels, num_sampled, unique)
    if subtract_log_q and sampler == "unigram":
        ok = ((true_expected > 0) | (labels < 0)).all()
        values = _values(x)
        if values == "sync" and not bool(ok):
            checks.fail("labels", _NEVER_DRAWN)
        elif values == "async":
            checks.assert_later("labels", ok, _NEVER_DRAWN + " (a device-side check failed)")
    return cand.ids, true_expected, cand.expected_count(cand.ids, num_sampled, unique)


def _values(x: torch.Tensor) -> str:
    """The mode of this op's value checks: they are few and small, so they read the data on every device
    ("sync"), unless KC_CHECK_VALUES=async queues them on the device; nothing reads values while tracing."""
    mode = checks.values_mode(x.device)
    if mode == "async" or torch.compiler.is_compiling() or x.device.type == "meta":
        return mode
    return "sync"


def sampled_softmax_loss(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                         *, num_sampled: Optional[int] = None, sampler: str = "log_uniform",
                         class_counts: Optional[torch.Tensor] = None, distortion: float = 1.0, unique: bool = True,
                         remove_accidental_hits: bool = True, accidental_hits: str = "all",
                         subtract_log_q: bool = True,
                         generator: Union[torch.Generator, samplers.PhiloxGenerator, None] = None, sampled=None,
                         sample_weight: Optional[torch.Tensor] = None, reduction: str = "mean",
                         sparse_grad: bool = False, backend: str = "auto") -> torch.Tensor:
    """Softmax cross-entropy over the true classes and num_sampled shared negatives, as TensorFlow defines it.

    labels [B] or [B, T] (-1 pads; each valid label has target 1/num_true). Negatives come from ``sampler``
    ("log_uniform", "uniform" or "unigram" over class_counts ** distortion), drawn on the CPU with ``generator``
    a CPU torch.Generator (or the default one; the ids then move to x's device), on x's device with ``generator`` a
    ``kc_kernels.PhiloxGenerator`` on that device (the same distribution and expected counts, drawn by torch ops
    that torch.compile keeps in the graph), or are given as ``sampled=(ids, true_expected, sampled_expected)``.
    Logits subtract log expected counts when subtract_log_q; sampled ids equal to a row's true label are masked
    when remove_accidental_hits: every copy of it among the samples with accidental_hits="all" (the default;
    sampling with replacement can draw a class several times), only its last drawn copy with "tensorflow", as
    tf.nn.sampled_softmax_loss does (docs/ops.md says why kc masks all). Without repeats (unique sampling, the
    default) the two are the same.
    sample_weight [B] scales each row's loss (a constant: it gets no gradient). With sparse_grad, weight.grad and
    bias.grad become sparse COO tensors holding only the touched rows (the sampled and true classes) on the cpu
    and triton backends; the reference backend always returns dense gradients. Under torch.autocast, x, weight and
    bias are cast as nn.Linear casts them; the loss stays fp32.

    With dense gradients (sparse_grad False) the cpu, triton and cuda backends run the loss as one torch.library
    custom op, ``kc_kernels::sampled_softmax`` (a fake implementation and registered autograd; the gradients are
    made in the forward for reduction "mean"/"sum"), so torch.compile and torch.export see a single node. Drawing
    the candidates on the host (a torch.Generator) is a graph break under torch.compile; a PhiloxGenerator, or fixed
    samples passed with ``sampled=``, give a graph without breaks (checks that read tensor values are skipped while
    compiling). sparse_grad keeps a torch.autograd.Function, since sparse COO gradients do not fit an op's schema.
    """
    checks.tensor("x", x, dims=(2,), floating=True)
    x, weight, bias = amp.cast_inputs(x.device.type, x, weight, bias)
    V = checks.linear_weights(x, weight, bias, need_classes=False)
    checks.tensor("labels", labels, dims=(1, 2), integer=True)
    checks.same_device("labels", labels, x, "x")
    if labels.shape[0] != x.shape[0]:
        checks.fail("labels", f"has {labels.shape[0]} rows but x has {x.shape[0]}")
    labels2 = labels if labels.dim() == 2 else labels[:, None]
    values = _values(x)
    if values == "sync":
        checks.index_range("labels", labels, V)
        if labels2.numel() and bool(((labels2 >= 0).sum(dim=1) == 0).any()):
            checks.fail("labels", "every row needs at least one label (a row is all -1 padding)")
    elif values == "async":
        checks.index_range_later("labels", labels, V)
        checks.assert_later("labels", (labels2 >= 0).any(dim=1).all(),
                            "every row needs at least one label (a device-side check failed)")
    checks.choice("reduction", reduction, REDUCTIONS)
    checks.choice("accidental_hits", accidental_hits, _op.ACCIDENTAL_HITS)
    if sample_weight is not None:
        checks.tensor("sample_weight", sample_weight, dims=(1,), floating=True)
        checks.same_device("sample_weight", sample_weight, x, "x")
        checks.shape("sample_weight", sample_weight, (x.shape[0],), "one weight per row")
    if sampled is not None:
        sampled = _check_sampled(sampled, labels, V, x)
        if num_sampled is not None and int(num_sampled) != len(sampled[0]):
            checks.fail("num_sampled", f"is {num_sampled} but sampled holds {len(sampled[0])} ids")
    else:
        if num_sampled is None or isinstance(num_sampled, bool) or int(num_sampled) != num_sampled or num_sampled < 1:
            checks.fail("num_sampled", f"must be a positive integer, got {num_sampled!r}")
        num_sampled = int(num_sampled)
        checks.choice("sampler", sampler, samplers.SAMPLERS)
        if unique and num_sampled > V:  # before the counts: the count of non-zero classes is then beside the point
            checks.fail("num_sampled", f"{num_sampled} exceeds the {V} classes (unique sampling)")
        if sampler == "unigram":
            if class_counts is None:
                checks.fail("class_counts", "the unigram sampler needs class_counts [V]")
            checks.tensor("class_counts", class_counts, dims=(1,))
            checks.shape("class_counts", class_counts, (V,), "one count per class")
            # the host draw reads the counts anyway; the in-graph draw follows the value-check mode
            counts_mode = values if isinstance(generator, samplers.PhiloxGenerator) else "sync"
            if counts_mode != "off":
                cc = class_counts.double()
                ok = torch.isfinite(cc).all() & (cc >= 0).all() & (cc.sum() > 0)
                if unique:
                    ok = ok & ((cc > 0).sum() >= num_sampled)
                msg = "must be finite, >= 0 and not all zero"
                if unique:
                    msg += f", with at least num_sampled ({num_sampled}) non-zero counts for unique sampling"
                if counts_mode == "sync" and not bool(ok):
                    checks.fail("class_counts", msg)
                elif counts_mode == "async":
                    checks.assert_later("class_counts", ok, msg + " (a device-side check failed)")
            checks.positive_number("distortion", distortion)
        if isinstance(generator, samplers.PhiloxGenerator):
            sampled = _draw_in_graph(sampler, num_sampled, V, generator, unique, class_counts, distortion, labels,
                                     subtract_log_q, x)
        else:
            cand = samplers.sample_candidates(sampler, num_sampled, V, unique=unique,
                                              class_counts=None if class_counts is None else class_counts.cpu(),
                                              distortion=distortion, generator=generator)
            ids = cand.ids.to(x.device)
            true_expected = cand.expected_count(labels.cpu(), num_sampled, unique)
            if subtract_log_q and bool(((true_expected <= 0) & (labels.cpu() >= 0)).any()):
                checks.fail("labels", _NEVER_DRAWN)
            sampled = (ids, true_expected.to(x.device),
                       cand.expected_count(cand.ids, num_sampled, unique).to(x.device))
    p = SampledSoftmaxProblem(x=x, weight=weight, bias=bias, labels=labels, sampled=sampled,
                              remove_accidental_hits=bool(remove_accidental_hits), accidental_hits=accidental_hits,
                              subtract_log_q=bool(subtract_log_q), reduction=reduction, sample_weight=sample_weight,
                              sparse_grad=bool(sparse_grad))
    name, row = dispatch.resolve("sampled_softmax_loss", backend, x.device, x.dtype)
    dispatch.check_inputs(row, "x", x)
    with amp.disabled(x.device.type):
        return dispatch.implementation(row)(p, name)
