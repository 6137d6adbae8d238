"""Public front of the fused linear + soft-target loss: argument checks once, then backend dispatch.

Semantics: docs/ops.md and kc_kernels/reference.py. Checks that read tensor values run by default for CPU tensors
only (see checks.values_mode): on a GPU they would synchronise with the host in every call, unless they are
queued as device-side assertions (KC_CHECK_VALUES=async).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, List, Optional

import torch

from kc_kernels import chunked as _op  # noqa: F401  (defines kc_kernels::chunked_soft_target)
from kc_kernels import dispatch
from kc_kernels.loss_modes import MODE_NAMES, LossMode
from kc_kernels.ops import amp, checks

MODES = MODE_NAMES  # the loss modes by name (kc_kernels/loss_modes.py)
REDUCTIONS = ("none", "sum", "mean")


@dataclass
class SoftTargetProblem:
    """A validated call of linear_soft_target_loss (x/weight/bias) or soft_target_loss (logits)."""

    batch: int
    num_classes: int
    mode: str
    reduction: str
    temperature: float
    x: Optional[torch.Tensor] = None  # [B, H] or grouped [B, G, H]
    weight: Optional[torch.Tensor] = None  # [V, H]
    bias: Optional[torch.Tensor] = None  # [V]
    logits: Optional[torch.Tensor] = None  # [B, V] (soft_target_loss)
    target_index: Optional[torch.Tensor] = None  # [B, K], -1 = padding
    target_value: Optional[torch.Tensor] = None  # [B, K]
    teacher_logits: Optional[torch.Tensor] = None  # [B, V]
    teacher_x: Optional[torch.Tensor] = None  # [B, Ht] or grouped [B, G, Ht]: a teacher head in place of its logits
    teacher_weight: Optional[torch.Tensor] = None  # [V, Ht]
    teacher_bias: Optional[torch.Tensor] = None  # [V]
    beta: float = 0.5  # jsd: M = beta z + (1 - beta) p
    softcap: Optional[float] = None  # y = softcap tanh((u + bias) / softcap) / T (linear_cross_entropy)
    z_loss: float = 0.0  # adds z_loss * lse^2 per segment (linear_cross_entropy)
    uniform_target: float = 0.0  # added to every class's target (label smoothing: eps / V)
    want_lse: bool = False  # the implementation returns (loss, lse [B, G]) (linear_cross_entropy's return_lse)
    # a hard-label term in the same walk (linear_distillation_loss at T = 1, one segment, modes softmax/kl):
    # per row + hard_weight (lse - y[label]) where hard_labels >= 0
    hard_labels: Optional[torch.Tensor] = None  # [B] int64, -1: no label
    hard_weight: float = 0.0
    segments: Optional[torch.Tensor] = None  # [G + 1] int64 on the input's device
    # the same offsets on the host ([0, V] when segments is None; None while torch.compile traces a segments tensor,
    # whose values the chunked op reads when it runs: checks.bounds_of)
    bounds: Optional[List[int]] = None
    scale: Optional[torch.Tensor] = None  # [G] or [V]
    sample_weight: Optional[torch.Tensor] = None  # [B]
    memory_budget: Optional[int] = None  # bytes a chunked backend may use for its class chunk (None: its default)
    check_teacher_nan: bool = False  # the dense teacher's values are still to be checked for NaN

    @property
    def grouped(self) -> bool:
        return self.x is not None and self.x.dim() == 3

    @property
    def num_segments(self) -> int:
        if self.bounds is None:
            assert self.segments is not None, "bounds or segments are set by the front's checks"
            return self.segments.shape[0] - 1
        return len(self.bounds) - 1

    @property
    def scale_per_class(self) -> bool:
        return (self.scale is not None and self.scale.numel() == self.num_classes
                and self.num_segments != self.num_classes)

    @property
    def teacher_head(self) -> bool:
        return self.teacher_weight is not None

    @property
    def dense_teacher(self) -> bool:
        """The targets come from a teacher's logits at every class (given, or made by a teacher head)."""
        return self.teacher_logits is not None or self.teacher_weight is not None

    @property
    def features(self) -> FrozenSet[str]:
        """What the call uses beyond the base modes (kc_kernels.dispatch.FEATURES)."""
        f = set()
        if self.mode in ("kl", "reverse_kl", "jsd"):
            f.add(f"mode:{self.mode}")
            if self.target_index is not None and LossMode.of(self.mode).terms.dense_teacher:
                f.add("sparse_teacher_tail")
        if self.teacher_head:
            f.add("teacher_head")
        if self.softcap is not None:
            f.add("softcap")
        if self.z_loss:
            f.add("z_loss")
        if self.uniform_target:
            f.add("label_smoothing")
        if self.want_lse:
            f.add("return_lse")
        if self.hard_labels is not None:
            f.add("hard_mix")
        return frozenset(f)

    def loss_kwargs(self) -> dict:
        kw = dict(target_index=self.target_index, target_value=self.target_value,
                  teacher_logits=self.teacher_logits, mode=self.mode, segments=self.segments, scale=self.scale,
                  temperature=self.temperature, sample_weight=self.sample_weight, reduction=self.reduction)
        if self.teacher_head:
            kw.update(teacher_x=self.teacher_x, teacher_weight=self.teacher_weight, teacher_bias=self.teacher_bias)
        if self.mode == "jsd":
            kw["beta"] = self.beta
        if self.softcap is not None or self.z_loss or self.uniform_target:
            kw.update(softcap=self.softcap, z_loss=self.z_loss, uniform_target=self.uniform_target)
        return kw


def _check_teacher_head(p: SoftTargetProblem, ref: torch.Tensor, ref_name: str, teacher_x, teacher_weight,
                        teacher_bias) -> None:
    """A teacher head in place of dense teacher logits: teacher_x [B, Ht] (or [B, G, Ht] like a grouped x),
    teacher_weight [V, Ht], teacher_bias [V]; any float dtype (each chunk's teacher logits are computed in the
    work dtype); no gradient reaches them."""
    if teacher_x is None or teacher_weight is None:
        missing, given = ("teacher_x", "teacher_weight") if teacher_x is None else ("teacher_weight", "teacher_x")
        checks.fail(missing, f"{given} was given without {missing}: a teacher head needs both")
    checks.tensor("teacher_x", teacher_x, dims=(2, 3), floating=True)
    checks.tensor("teacher_weight", teacher_weight, dims=(2,), floating=True)
    checks.same_device("teacher_x", teacher_x, ref, ref_name)
    checks.same_device("teacher_weight", teacher_weight, ref, ref_name)
    if teacher_x.shape[0] != p.batch:
        checks.fail("teacher_x", f"has {teacher_x.shape[0]} rows but the batch is {p.batch}")
    if teacher_weight.shape[0] != p.num_classes:
        checks.fail("teacher_weight", f"has {teacher_weight.shape[0]} classes but the student has {p.num_classes}")
    if teacher_weight.shape[1] != teacher_x.shape[-1]:
        checks.fail("teacher_weight", f"has {teacher_weight.shape[1]} input features but teacher_x has "
                                      f"{teacher_x.shape[-1]}")
    if teacher_x.dtype != teacher_weight.dtype:
        checks.fail("teacher_weight", f"dtype {teacher_weight.dtype} differs from teacher_x's {teacher_x.dtype}")
    if teacher_bias is not None:
        checks.tensor("teacher_bias", teacher_bias, dims=(1,), floating=True)
        checks.same_device("teacher_bias", teacher_bias, ref, ref_name)
        checks.shape("teacher_bias", teacher_bias, (p.num_classes,), "one per class")
    values = checks.values_mode(ref.device)
    for name, t in (("teacher_x", teacher_x), ("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias)):
        if t is None:
            continue
        if values == "sync":
            checks.finite(name, t)
        elif values == "async":
            checks.assert_later(name, torch.isfinite(t).all(), "contains NaN or infinite values (a device-side "
                                                               "check failed)")
    p.teacher_x, p.teacher_weight = teacher_x.detach(), teacher_weight.detach()
    p.teacher_bias = None if teacher_bias is None else teacher_bias.detach()


def _check_targets(p: SoftTargetProblem, ref: torch.Tensor, ref_name: str, target_index, target_value,
                   teacher_logits, teacher_x=None, teacher_weight=None, teacher_bias=None):
    B, V = p.batch, p.num_classes
    sparse = target_index is not None or target_value is not None
    head = teacher_x is not None or teacher_weight is not None or teacher_bias is not None
    if head:
        if sparse or teacher_logits is not None:
            checks.fail("teacher_x", "give one form of targets: a teacher head (teacher_x, teacher_weight), "
                                     "teacher_logits, or target_index/target_value")
        _check_teacher_head(p, ref, ref_name, teacher_x, teacher_weight, teacher_bias)
        return
    if sparse and teacher_logits is not None:
        checks.fail("teacher_logits", "give either target_index/target_value or teacher_logits, not both")
    if not sparse and teacher_logits is None:
        checks.fail("target_index", "no targets: give target_index and target_value, teacher_logits, or a teacher "
                                    "head (teacher_x, teacher_weight)")
    if sparse:
        if target_index is None:
            checks.fail("target_index", "target_value was given without target_index")
        if target_value is None:
            checks.fail("target_value", "target_index was given without target_value")
        checks.tensor("target_index", target_index, dims=(2,), integer=True)
        checks.tensor("target_value", target_value, dims=(2,), floating=True)
        checks.same_device("target_index", target_index, ref, ref_name)
        checks.same_device("target_value", target_value, ref, ref_name)
        if target_index.shape[0] != B:
            checks.fail("target_index", f"has {target_index.shape[0]} rows but the batch is {B}")
        if target_value.shape != target_index.shape:
            checks.fail("target_value", f"shape {tuple(target_value.shape)} differs from target_index "
                                        f"{tuple(target_index.shape)}")
        values = checks.values_mode(ref.device)
        if values == "sync":
            checks.index_range("target_index", target_index, V)
        if target_value.numel() and values == "sync":
            if bool(torch.isnan(target_value).any()):
                checks.fail("target_value", "contains NaN")
            if bool((target_value < 0).any()):
                checks.fail("target_value", "contains negative values (targets are probabilities or weights >= 0)")
            checks.finite("target_value", target_value)
        if values == "async":
            checks.index_range_later("target_index", target_index, V)
            checks.assert_later("target_value", (torch.isfinite(target_value) & (target_value >= 0)).all(),
                                "contains NaN, infinite or negative values (a device-side check failed)")
        p.target_index, p.target_value = target_index, target_value
    else:
        checks.tensor("teacher_logits", teacher_logits, dims=(2,), floating=True)
        checks.same_device("teacher_logits", teacher_logits, ref, ref_name)
        checks.shape("teacher_logits", teacher_logits, (B, V), "batch x classes")
        # the NaN check reads all B x V values: a backend whose own pass over the teacher reports NaN does it there
        # (its row's capability TEACHER_NAN), the others get it in _dispatch
        values = checks.values_mode(ref.device)
        p.check_teacher_nan = values == "sync"
        if values == "async":
            checks.assert_later("teacher_logits", ~torch.isnan(teacher_logits).any(),
                                "contains NaN (a device-side check failed)")
        p.teacher_logits = teacher_logits


def _check_mode(p: SoftTargetProblem, mode, beta) -> None:
    """mode and beta: "jsd" with beta 0 is "kl" and with beta 1 "reverse_kl" (their limits as Liger-Kernel takes
    them); beta is read by "jsd" only."""
    p.mode = checks.choice("mode", mode, MODES)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= float(beta) <= 1.0:
        checks.fail("beta", f"must be a number in [0, 1], got {beta!r}")
    p.beta = float(beta)
    if p.mode == "jsd" and p.beta in (0.0, 1.0):
        p.mode = "kl" if p.beta == 0.0 else "reverse_kl"


def _check_common(p: SoftTargetProblem, ref: torch.Tensor, ref_name: str, *, target_index, target_value,
                  teacher_logits, segments, scale, sample_weight, grouped_groups: Optional[int],
                  teacher_x=None, teacher_weight=None, teacher_bias=None):
    _check_targets(p, ref, ref_name, target_index, target_value, teacher_logits, teacher_x, teacher_weight,
                   teacher_bias)
    bounds, p.segments = checks.segment_layout(segments, p.num_classes, ref.device, defer=True)
    p.bounds = bounds if bounds is not None else (None if p.segments is not None else [0, p.num_classes])
    if grouped_groups is not None:
        if p.segments is None:
            checks.fail("segments", "grouped x [B, G, H] needs segments (G + 1 class offsets)")
        if grouped_groups != p.num_segments:
            checks.fail("x", f"grouped x has G={grouped_groups} groups but segments define {p.num_segments}")
    if p.teacher_x is not None and (p.teacher_x.dim() == 3) != (grouped_groups is not None):
        checks.fail("teacher_x", "must be grouped [B, G, Ht] exactly when x is grouped [B, G, H]")
    if p.teacher_x is not None and p.teacher_x.dim() == 3 and p.teacher_x.shape[1] != p.num_segments:
        checks.fail("teacher_x", f"grouped teacher_x has {p.teacher_x.shape[1]} groups but segments define "
                                 f"{p.num_segments}")
    if scale is not None and not LossMode.of(p.mode).terms.takes_scale:
        checks.fail("scale", f"mode {p.mode!r} takes no self-paced scale (use softmax, kl or sigmoid)")
    if scale is not None:
        checks.tensor("scale", scale, dims=(1,), floating=True)
        checks.same_device("scale", scale, ref, ref_name)
        if scale.numel() not in (p.num_segments, p.num_classes):
            checks.fail("scale", f"length {scale.numel()} is neither the number of segments {p.num_segments} "
                                 f"nor the number of classes {p.num_classes}")
        p.scale = scale
    if sample_weight is not None:
        checks.tensor("sample_weight", sample_weight, dims=(1,), floating=True)
        checks.same_device("sample_weight", sample_weight, ref, ref_name)
        checks.shape("sample_weight", sample_weight, (p.batch,), "one weight per row")
        values = checks.values_mode(ref.device)
        if values == "sync" and bool(torch.isnan(sample_weight).any()):
            checks.fail("sample_weight", "contains NaN")
        if values == "async":
            checks.assert_later("sample_weight", ~torch.isnan(sample_weight).any(),
                                "contains NaN (a device-side check failed)")
        p.sample_weight = sample_weight


def _check_budget(memory_budget) -> Optional[int]:
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0:
        checks.fail("memory_budget", f"must be a positive number of bytes, got {memory_budget!r}")
    return memory_budget


def _dispatch(op: str, p: SoftTargetProblem, backend: str, device: torch.device) -> torch.Tensor:
    inp = p.x if p.x is not None else p.logits
    assert inp is not None
    name, row = dispatch.resolve(op, backend, device, inp.dtype, p.features)
    dispatch.check_inputs(row, "x" if p.x is not None else "logits", inp)
    if p.bounds is None and not row.implementation.startswith("kc_kernels.chunked:"):
        assert p.segments is not None
        p.bounds = checks.bounds_of(p.segments, p.num_classes)  # (only the chunked op reads them inside a graph)
    if p.check_teacher_nan and p.teacher_logits is not None and not (
            LossMode.of(p.mode).terms.teacher_lse and dispatch.TEACHER_NAN in row.capabilities):
        if bool(torch.isnan(p.teacher_logits).any()):
            checks.fail("teacher_logits", "contains NaN")
    with amp.disabled(device.type):
        return dispatch.implementation(row)(p, name)


def linear_soft_target_loss(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                            target_index: Optional[torch.Tensor] = None, target_value: Optional[torch.Tensor] = None,
                            teacher_logits: Optional[torch.Tensor] = None, teacher_x: Optional[torch.Tensor] = None,
                            teacher_weight: Optional[torch.Tensor] = None,
                            teacher_bias: Optional[torch.Tensor] = None, mode: str = "sigmoid", beta: float = 0.5,
                            segments=None, scale: Optional[torch.Tensor] = None, temperature: float = 1.0,
                            sample_weight: Optional[torch.Tensor] = None, reduction: str = "mean",
                            backend: str = "auto", memory_budget: Optional[int] = None) -> torch.Tensor:
    """Loss of the logits ``x @ weight.T + bias`` against soft targets, without materialising [B, V] logits.

    x [B, H] (or grouped [B, G, H] with segments), weight [V, H], bias [V]. Targets are either sparse
    (target_index [B, K] with -1 padding, target_value [B, K]; duplicates add up), dense teacher_logits [B, V], or
    a teacher head (teacher_x [B, Ht], teacher_weight [V, Ht], teacher_bias [V]) whose logits are computed chunk by
    chunk and never held for all classes (the teacher gets no gradient).
    mode "sigmoid": binary cross-entropy summed over classes; "softmax": cross-entropy per segment (times T^2);
    "kl": KL(teacher || student); "reverse_kl": KL(student || teacher); "jsd": the generalized Jensen-Shannon
    divergence with weight ``beta`` (0 is "kl", 1 "reverse_kl"); all per segment and times T^2.
    scale [G] or [V] applies the self-paced L2-normalised scaling per segment. Returns fp32 (fp64 for fp64 input):
    [B] for reduction="none", else a scalar. memory_budget (bytes) bounds the class chunk of the chunked
    backends (cpu: default 64 MiB; GPU: 512 MiB). Under torch.autocast, x, weight and bias are cast as nn.Linear
    casts them; the loss stays fp32. See docs/ops.md.
    """
    p = linear_problem(x, weight, bias, target_index=target_index, target_value=target_value,
                       teacher_logits=teacher_logits, teacher_x=teacher_x, teacher_weight=teacher_weight,
                       teacher_bias=teacher_bias, mode=mode, beta=beta, segments=segments, scale=scale,
                       temperature=temperature, sample_weight=sample_weight, reduction=reduction,
                       memory_budget=memory_budget)
    assert p.x is not None
    return _dispatch("linear_soft_target_loss", p, backend, p.x.device)


def linear_problem(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                   target_index=None, target_value=None, teacher_logits=None, teacher_x=None, teacher_weight=None,
                   teacher_bias=None, mode: str = "sigmoid", beta: float = 0.5, segments=None, scale=None,
                   temperature: float = 1.0, sample_weight=None, reduction: str = "mean",
                   memory_budget: Optional[int] = None) -> SoftTargetProblem:
    """The checked problem of a linear_soft_target_loss call (the fronts that build on it add fields)."""
    checks.tensor("x", x, dims=(2, 3), floating=True)
    x, weight, bias = amp.cast_inputs(x.device.type, x, weight, bias)
    V = checks.linear_weights(x, weight, bias)
    p = SoftTargetProblem(batch=x.shape[0], num_classes=V, mode="sigmoid",
                          reduction=checks.choice("reduction", reduction, REDUCTIONS),
                          temperature=checks.positive_number("temperature", temperature), x=x, weight=weight, bias=bias)
    _check_mode(p, mode, beta)
    _check_common(p, x, "x", target_index=target_index, target_value=target_value, teacher_logits=teacher_logits,
                  segments=segments, scale=scale, sample_weight=sample_weight,
                  grouped_groups=x.shape[1] if x.dim() == 3 else None, teacher_x=teacher_x,
                  teacher_weight=teacher_weight, teacher_bias=teacher_bias)
    p.memory_budget = _check_budget(memory_budget)
    return p


def soft_target_loss(logits: torch.Tensor, *, target_index: Optional[torch.Tensor] = None,
                     target_value: Optional[torch.Tensor] = None, teacher_logits: Optional[torch.Tensor] = None,
                     mode: str = "sigmoid", beta: float = 0.5, segments=None,
                     scale: Optional[torch.Tensor] = None, temperature: float = 1.0,
                     sample_weight: Optional[torch.Tensor] = None, reduction: str = "mean", backend: str = "auto",
                     memory_budget: Optional[int] = None) -> torch.Tensor:
    """The soft-target loss of given raw logits [B, V]; same keyword arguments as linear_soft_target_loss."""
    checks.tensor("logits", logits, dims=(2,), floating=True)
    if logits.shape[1] == 0:
        checks.fail("logits", "has no classes (0 columns)")
    p = SoftTargetProblem(batch=logits.shape[0], num_classes=logits.shape[1], mode="sigmoid",
                          reduction=checks.choice("reduction", reduction, REDUCTIONS),
                          temperature=checks.positive_number("temperature", temperature), logits=logits)
    _check_mode(p, mode, beta)
    _check_common(p, logits, "logits", target_index=target_index, target_value=target_value,
                  teacher_logits=teacher_logits, segments=segments, scale=scale, sample_weight=sample_weight,
                  grouped_groups=None)
    p.memory_budget = _check_budget(memory_budget)
    return _dispatch("soft_target_loss", p, backend, logits.device)
