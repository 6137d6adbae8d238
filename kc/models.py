"""Networks: backbones (MLP for features, a small CNN for images, or any nn.Module with an `out_dim`), the
student's heads (FC-FC, FC-SC, SC-SC, FC-SC with a shared part), the self-paced scale, and the specialists.

A head ends in the hidden units that feed the output layer; the output layer (weight [N, s2], bias [N]) is not
applied here but handed to kc_kernels.linear_soft_target_loss, so the output layer and the loss are one op. An SC
head's hidden units are grouped [B, M, s2]: vertical g's classes read block g, which is the op's grouped input.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

import kc_kernels

# ------------------------------------------------------------------------------------------ backbones

class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int):
        super().__init__()
        layers, prev = [], in_dim
        for h in list(hidden) + [out_dim]:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Three conv blocks and global average pooling: enough for small images in tests and demos."""

    def __init__(self, in_channels: int, out_dim: int, width: int = 32):
        super().__init__()
        c = width
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * c, out_dim), nn.ReLU())
        self.out_dim = out_dim

    def forward(self, x) -> torch.Tensor:
        return self.net(x)


def make_backbone(kind: str, input_shape: Sequence[int], hidden: Sequence[int], out_dim: int) -> nn.Module:
    if kind == "mlp":
        if len(input_shape) != 1:
            raise ValueError(f"an MLP backbone needs feature vectors, got inputs of shape {tuple(input_shape)}")
        return MLP(input_shape[0], hidden, out_dim)
    if kind == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"a CNN backbone needs images [C, H, W], got inputs of shape {tuple(input_shape)}")
        return SmallCNN(input_shape[0], out_dim, width=hidden[0] if hidden else 32)
    raise ValueError(f"unknown backbone {kind!r}")


# ------------------------------------------------------------------------------------------ heads

class BlockLinear(nn.Module):
    """M independent linear maps in one batched weight [M, out, in]: an SC layer's per-vertical blocks."""

    def __init__(self, blocks: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(blocks, out_dim, in_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(blocks, out_dim).uniform_(-bound, bound))

    def forward(self, x) -> torch.Tensor:
        # x [B, in] (shared input: every block reads it) or [B, M, in] (block g reads x[:, g])
        if x.dim() == 2:  # one GEMM against the blocks stacked: [B, in] x [in, M * out]
            M, out, inp = self.weight.shape
            return nn.functional.linear(x, self.weight.reshape(M * out, inp), self.bias.reshape(M * out)).view(
                x.shape[0], M, out)
        return torch.einsum("bmi,moi->bmo", x, self.weight) + self.bias


class Head(nn.Module):
    """Hidden layers between the backbone (width sb) and the output layer over N classes in M verticals."""

    def __init__(self, kind: str, sb: int, num_classes: int, num_verticals: int, *, s1=128, s2=32, s1s=128, s1i=16,
                 s2_fc=32, shared=4):
        super().__init__()
        self.kind, M, N = kind, num_verticals, num_classes
        if kind == "fc_fc":
            self.layers = nn.ModuleList([nn.Linear(sb, s1), nn.Linear(s1, s2_fc)])
            self.width = s2_fc
        elif kind == "fc_sc":
            self.layers = nn.ModuleList([nn.Linear(sb, s1s), BlockLinear(M, s1s, s2)])
            self.width = s2
        elif kind == "fc_fc_matched":
            w = matched_width(sb=sb, N=N, M=M, s1=s1, s2=s2, s1s=s1s)
            self.layers = nn.ModuleList([nn.Linear(sb, s1), nn.Linear(s1, w)])
            self.width = w
        elif kind == "sc_sc":
            self.layers = nn.ModuleList([BlockLinear(M, sb, s1i), BlockLinear(M, s1i, s2)])
            self.width = s2
        elif kind == "fc_sc_shared":
            self.layers = nn.ModuleList([nn.Linear(sb, s1s), nn.Linear(s1s, shared), BlockLinear(M, s1s, s2 - shared)])
            self.width = s2
        else:
            raise ValueError(f"unknown head {kind!r}; known: fc_fc, fc_sc, sc_sc, fc_sc_shared, fc_fc_matched")
        self.grouped = kind not in ("fc_fc", "fc_fc_matched")
        self.num_verticals = M
        self.weight = nn.Parameter(torch.empty(N, self.width))  # the output layer, applied inside the loss op
        # a sample carries few of the N labels: starting every probability near 1/N skips a long first phase
        # spent only pushing all logits down
        self.bias = nn.Parameter(torch.full((N,), -math.log(N)))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.width))

    def forward(self, f) -> torch.Tensor:
        """[B, sb] -> [B, s2] (FC-FC) or grouped [B, M, s2]."""
        relu = torch.relu
        # the units feeding the output layer stay linear (a bottleneck: no ReLU that would zero part of it)
        if self.kind == "fc_sc_shared":
            h = relu(self.layers[0](f))
            common = self.layers[1](h)  # [B, x], the part every vertical's block shares
            own = self.layers[2](h)  # [B, M, s2 - x]
            return torch.cat([common[:, None, :].expand(-1, self.num_verticals, -1), own], dim=2)
        h = f
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = relu(h)
        return h


def matched_width(*, sb, N, M, s1=128, s2=32, s1s=128) -> int:
    """The FC-FC second-layer width whose head has as many weights as the FC-SC head (the size-matched baseline:
    FC-SC's gain over it is the structure's, not the extra weights')."""
    target = head_weight_count("fc_sc", sb=sb, N=N, M=M, s2=s2, s1s=s1s)
    return max(1, int(round((target - sb * s1) / (s1 + N))))


def head_weight_count(kind: str, *, sb, N, M, s1=128, s2=32, s1s=128, s1i=16, s2_fc=32, shared=4) -> int:
    """The parameter counts of a head (docs/method.md) (weights, without biases), output layer included."""
    if kind == "fc_fc":
        return sb * s1 + s1 * s2_fc + s2_fc * N
    if kind == "fc_fc_matched":
        w = matched_width(sb=sb, N=N, M=M, s1=s1, s2=s2, s1s=s1s)
        return sb * s1 + s1 * w + w * N
    if kind == "fc_sc":
        return sb * s1s + s1s * s2 * M + s2 * N
    if kind == "sc_sc":
        return sb * s1i * M + s1i * s2 * M + s2 * N
    if kind == "fc_sc_shared":
        return sb * s1s + s1s * shared + s1s * (s2 - shared) * M + s2 * N
    raise ValueError(kind)


def count_parameters(module: nn.Module, weights_only: bool = False) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not (weights_only and n.endswith("bias")))


# ------------------------------------------------------------------------------------------ student

class Student(nn.Module):
    """Backbone + head + output layer (+ self-paced scale) over all classes; trained through the fused op."""

    def __init__(self, backbone: nn.Module, head: Head, segments: np.ndarray, scale: str = "none",
                 backend: str = "auto", scale_init: str = "sqrt", scale_init_k: float = 1.0,
                 scale_init_value: float = 10.0):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.register_buffer("segments", torch.as_tensor(np.asarray(segments), dtype=torch.long))
        sizes = torch.diff(self.segments).double()
        self.scale_kind = scale
        # gamma is learnt as log(gamma): a log step is the same relative change at any size, for every vertical
        # alike. Creating it draws no random numbers, so a student with the scale starts from exactly the same
        # weights as the one without (same seed, same head).
        log_init = initial_log_scale(sizes, scale_init, scale_init_k, scale_init_value)
        if scale == "vertical":
            self.log_scale = nn.Parameter(log_init.float())
        elif scale == "class":
            self.log_scale = nn.Parameter(torch.repeat_interleave(log_init, torch.diff(self.segments)).float())
        elif scale == "none":
            self.log_scale = None
        else:
            raise ValueError(f"unknown scale {scale!r}; known: none, vertical, class")
        self.backend = backend

    @property
    def num_classes(self) -> int:
        return self.head.weight.shape[0]

    @torch.no_grad()
    def init_bias(self, positives: np.ndarray, rows: int) -> None:
        """Output bias at the logit of each class's training frequency (the class prior). The bias is added after
        the self-paced scale, so with it the normalised part only has to say how a row differs from the prior."""
        p = (np.asarray(positives, dtype=np.float64) + 0.5) / (rows + 1.0)
        self.head.bias.copy_(torch.from_numpy(np.log(p) - np.log1p(-p)).float())

    @property
    def scale(self) -> Optional[torch.Tensor]:
        """The self-paced gamma ([M] or [N]), or None."""
        return None if self.log_scale is None else self.log_scale.exp()

    def forward(self, x) -> torch.Tensor:
        """The hidden units that feed the output layer: [B, s2] (FC-FC heads) or grouped [B, M, s2].

        The output layer is not applied here: it and the loss are one op, ``Student.loss`` (the fused
        kc_kernels.linear_soft_target_loss over the head's weight and bias, never materialising [B, N] logits).
        ``scores(x)`` gives the dense logits [B, N] for small problems and tests."""
        return self.head(self.backbone(x))

    def hidden(self, x) -> torch.Tensor:
        """The same as ``self(x)``: the hidden units that feed the output layer."""
        return self(x)

    def loss(self, x, target_index, target_value, sample_weight=None) -> torch.Tensor:
        h = self(x)
        return kc_kernels.linear_soft_target_loss(
            h, self.head.weight, self.head.bias, target_index=target_index, target_value=target_value,
            mode="sigmoid", segments=self.segments, scale=self.scale, sample_weight=sample_weight,
            backend=self.backend)

    def gamma(self, vertical: int, c0: int, c1: int) -> Optional[torch.Tensor]:
        """The self-paced scale of classes [c0, c1) of ``vertical`` as one segment's: [1] per vertical,
        [c1 - c0] per class; None without a scale."""
        if self.scale is None:
            return None
        return self.scale[vertical:vertical + 1] if self.scale_kind == "vertical" else self.scale[c0:c1]

    @torch.no_grad()
    def scores(self, x) -> torch.Tensor:
        """Dense logits y [B, N] (after the self-paced scale; kc_kernels.soft_target_logits): for small problems
        and tests."""
        return kc_kernels.soft_target_logits(self(x), self.head.weight, self.head.bias, self.segments, self.scale)


def initial_log_scale(sizes: torch.Tensor, rule: str = "sqrt", k: float = 1.0, value: float = 10.0) -> torch.Tensor:
    """log(gamma_v) at the start, per vertical of N_v classes.

    "sqrt": gamma = sqrt(N_v), the paper's. With u / ||u|| an L2-normalised vector over N_v classes, a class's
    normalised score is about 1 / sqrt(N_v) in size, so gamma = sqrt(N_v) gives logits of order one around the
    bias, whatever the vertical's size. "sqrt_log": sqrt(N_v) * ln(N_v / k): a row's positive has to stand out
    from N_v negatives, which takes a margin growing like ln(N_v / k) (k: positives per row).
    "fixed": gamma = value everywhere."""
    sizes = sizes.double()
    if rule == "sqrt":
        return 0.5 * sizes.log()
    if rule == "sqrt_log":
        return 0.5 * sizes.log() + torch.log(torch.clamp(torch.log(sizes / k), min=1.0))
    if rule == "fixed":
        return torch.full_like(sizes, math.log(value))
    raise ValueError(f"unknown scale init {rule!r}; known: sqrt, sqrt_log, fixed")


def build_student(cfg, input_shape, taxonomy, head: str, scale: str, backend: str = "auto") -> Student:
    st = cfg.student
    backbone = make_backbone(st.backbone, input_shape, st.backbone_hidden, st.sb)
    h = Head(head, st.sb, taxonomy.num_classes, taxonomy.num_verticals, s1=st.s1, s2=st.s2, s1s=st.s1s, s1i=st.s1i,
             s2_fc=st.s2_fc, shared=st.shared)
    return Student(backbone, h, taxonomy.segments, scale=scale, backend=backend, scale_init=st.scale_init,
                   scale_init_k=st.scale_init_k, scale_init_value=st.scale_init_value)


# ------------------------------------------------------------------------------------------ specialists

class Specialist(nn.Module):
    """One vertical's teacher: its own backbone and an output layer over the vertical's classes only."""

    def __init__(self, backbone: nn.Module, num_classes: int, vertical: int, first_class: int):
        super().__init__()
        self.backbone = backbone
        self.out = nn.Linear(backbone.out_dim, num_classes)
        nn.init.constant_(self.out.bias, -math.log(max(num_classes, 2)))  # see Head: labels are sparse
        self.vertical, self.first_class = vertical, first_class

    def forward(self, x) -> torch.Tensor:
        """Logits over the vertical's classes [B, N_v]."""
        return self.out(self.backbone(x))


def build_specialist(cfg, input_shape, taxonomy, vertical: int) -> Specialist:
    sp = cfg.specialists
    kind = cfg.student.backbone
    hidden: List[int] = list(sp.hidden)
    out_dim = hidden[-1] if kind == "mlp" else cfg.student.sb
    backbone = make_backbone(kind, input_shape, hidden[:-1] if kind == "mlp" else hidden, out_dim)
    rng = taxonomy.classes_of(vertical)
    return Specialist(backbone, len(rng), vertical, rng.start)
