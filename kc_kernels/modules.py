"""nn.Module wrappers of the functional ops. They hold the loss's configuration; the layers' parameters stay with
the model that owns them, so the same weight can serve inference (x @ weight.T) and the fused loss. Tensors of the
configuration (segment offsets, class counts) are buffers: in the state_dict and moved by ``.to()``."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from kc_kernels.ops import linear_soft_target_loss, sampled_softmax_loss
from kc_kernels.samplers import PhiloxGenerator


class LinearSoftTargetLoss(nn.Module):
    """``loss = LinearSoftTargetLoss(mode="sigmoid", segments=...)(x, weight, bias, target_index=..., ...)``.

    ``segments`` is a buffer (int64 [G + 1]); its offsets are also kept on the host, so that a call never reads the
    buffer back from a GPU and torch.compile sees a constant layout."""

    segments: Optional[torch.Tensor]

    def __init__(self, mode: str = "sigmoid", segments: Any = None, temperature: float = 1.0,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.mode, self.temperature, self.reduction, self.backend = mode, temperature, reduction, backend
        offsets = None if segments is None else torch.as_tensor(segments, dtype=torch.long).detach().clone()
        self.register_buffer("segments", offsets)
        self._refresh_bounds()

    def _refresh_bounds(self) -> None:
        seg = self.segments
        self._bounds: Optional[Tuple[int, ...]] = None if seg is None else tuple(seg.tolist())
        self._bounds_version = None if seg is None else (seg.data_ptr(), seg._version)

    def _host_bounds(self) -> Optional[List[int]]:
        # outside compilation, an in-place change of the buffer is picked up (its version moves on)
        seg = self.segments
        if seg is not None and not torch.compiler.is_compiling() and \
                (seg.data_ptr(), seg._version) != self._bounds_version:
            self._refresh_bounds()
        return None if self._bounds is None else list(self._bounds)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        loaded = state_dict.get(prefix + "segments")
        if loaded is not None:
            # a layout of another length replaces the buffer rather than failing to copy into it
            device = self.segments.device if self.segments is not None else loaded.device
            self.segments = torch.empty(loaded.shape, dtype=torch.long, device=device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._refresh_bounds()

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                target_index: Optional[torch.Tensor] = None, target_value: Optional[torch.Tensor] = None,
                teacher_logits: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return linear_soft_target_loss(x, weight, bias, target_index=target_index, target_value=target_value,
                                       teacher_logits=teacher_logits, mode=self.mode, segments=self._host_bounds(),
                                       scale=scale, temperature=self.temperature, sample_weight=sample_weight,
                                       reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        g = 1 if self.segments is None else len(self.segments) - 1
        return f"mode={self.mode}, segments={g}, temperature={self.temperature}, reduction={self.reduction}"


class SampledSoftmaxLoss(nn.Module):
    """Sampled softmax with its own seeded generator: ``SampledSoftmaxLoss(8192, seed=0)(x, weight, bias, labels)``.

    With ``in_graph`` the candidates are drawn on the inputs' device by a PhiloxGenerator whose state is the
    buffer ``sampler_state`` (in the state_dict, moved by .to()), so a compiled step keeps the draw in its graph."""

    def __init__(self, num_sampled: int, sampler: str = "log_uniform", class_counts: Optional[torch.Tensor] = None,
                 distortion: float = 1.0, unique: bool = True, remove_accidental_hits: bool = True,
                 subtract_log_q: bool = True, reduction: str = "mean", seed: Optional[int] = None,
                 sparse_grad: bool = False, backend: str = "auto", accidental_hits: str = "all",
                 in_graph: bool = False):
        super().__init__()
        self.num_sampled, self.sampler, self.distortion, self.unique = num_sampled, sampler, distortion, unique
        self.remove_accidental_hits, self.subtract_log_q = remove_accidental_hits, subtract_log_q
        self.accidental_hits = accidental_hits
        self.reduction, self.backend, self.sparse_grad = reduction, backend, sparse_grad
        self.register_buffer("class_counts", None if class_counts is None else torch.as_tensor(class_counts))
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self.in_graph = in_graph
        if in_graph:
            key = int(torch.randint(0, 2 ** 62, (), generator=self.generator))
            self.register_buffer("sampler_state", PhiloxGenerator(key).state)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor, *,
                sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return sampled_softmax_loss(x, weight, bias, labels, num_sampled=self.num_sampled, sampler=self.sampler,
                                    class_counts=self.class_counts, distortion=self.distortion, unique=self.unique,
                                    remove_accidental_hits=self.remove_accidental_hits,
                                    accidental_hits=self.accidental_hits, subtract_log_q=self.subtract_log_q,
                                    generator=PhiloxGenerator(state=self.sampler_state) if self.in_graph
                                    else self.generator,
                                    sample_weight=sample_weight, reduction=self.reduction,
                                    sparse_grad=self.sparse_grad, backend=self.backend)

    def extra_repr(self) -> str:
        return f"num_sampled={self.num_sampled}, sampler={self.sampler}, unique={self.unique}, in_graph={self.in_graph}"
