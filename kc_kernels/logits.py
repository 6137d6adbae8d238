"""The student's logits of the soft-target op, for scoring and evaluation: the y that the fused loss never holds.

    y = gamma * u / sqrt(sum_{i in seg(j)} u_i^2 + 1e-12) + bias      (u = x w; without a scale, y = u + bias)

as kc_kernels/reference.py defines it (before the temperature, which only the loss applies), in the same order of
operations, so that a float64 call gives the reference's bits.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from kc_kernels.layout import NORM_EPS  # added to a segment's sum of squares under a scale
from kc_kernels.ops.checks import fail
from kc_kernels.reduction import compute_dtype

__all__ = ["soft_target_logits"]


def soft_target_logits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       segments: Union[None, Sequence[int], torch.Tensor] = None,
                       scale: Optional[torch.Tensor] = None, *, block: Optional[int] = None,
                       norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits y [B, V] of ``linear_soft_target_loss``'s student (no temperature), in fp32 (fp64 for fp64 inputs).

    x [B, H] or grouped [B, G, H] (segment g's classes read ``x[:, g]``), weight [V, H], bias [V], segments G + 1
    offsets (None: one segment), scale None, [G] or [V] (per class where G != V), as the op takes them.
    ``block``: rows computed at a time, so the temporaries beside the output are [block, V] (all rows at once when
    None). ``norms`` [B, G]: each row's L2 norm of u over each segment, where the caller already has it (from a
    Gram matrix, or a segment that ``weight`` holds only part of); computed from u otherwise.
    """
    if x.dim() not in (2, 3):
        fail("x", f"must be [B, H] or grouped [B, G, H], got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        fail("weight", f"must be [V, {x.shape[-1]}], got {tuple(weight.shape)}")
    V = weight.shape[0]
    bounds = [0, V] if segments is None else [int(b) for b in (segments.tolist() if torch.is_tensor(segments)
                                                               else segments)]
    if bounds[0] != 0 or bounds[-1] != V or any(a >= b for a, b in zip(bounds, bounds[1:])):
        fail("segments", f"must increase strictly from 0 to V={V}, got {bounds}")
    G = len(bounds) - 1
    if x.dim() == 3 and x.shape[1] != G:
        fail("x", f"grouped x has {x.shape[1]} groups but there are {G} segments")
    if bias is not None and tuple(bias.shape) != (V,):
        fail("bias", f"must be [{V}], got {tuple(bias.shape)}")
    if scale is not None and scale.numel() not in (G, V):
        fail("scale", f"length {scale.numel()} is neither the number of segments {G} nor of classes {V}")
    if norms is not None:
        if scale is None:
            fail("norms", "the norms only enter the logits under a scale")
        if tuple(norms.shape) != (x.shape[0], G):
            fail("norms", f"must be [{x.shape[0]}, {G}], got {tuple(norms.shape)}")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        fail("block", f"must be a positive number of rows, got {block!r}")

    dt = compute_dtype(x.dtype)
    B, device = x.shape[0], x.device
    w = weight.to(dt)
    seg = gamma = None
    if scale is not None:
        seg = torch.repeat_interleave(torch.arange(G, device=device),
                                      torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], device=device))
        gamma = scale.to(dt)
        gamma = gamma[seg] if gamma.numel() == G else gamma
    out = torch.empty(B, V, dtype=dt, device=device)
    for r0 in range(0, B, block or max(B, 1)):
        r1 = min(B, r0 + (block or B))
        xb = x[r0:r1].to(dt)
        if xb.dim() == 2:
            u = xb @ w.t()
        else:
            u = torch.cat([xb[:, g] @ w[bounds[g]:bounds[g + 1]].t() for g in range(G)], dim=1)
        y = u
        if scale is not None:
            if norms is None:
                n = torch.sqrt(u.new_zeros(r1 - r0, G).index_add(1, seg, u * u) + NORM_EPS)
            else:
                n = norms[r0:r1].to(dt)
            y = gamma * u / n[:, seg]
        if bias is not None:
            y = y + bias.to(dt)  # a class prior: never normalised together with x.w
        out[r0:r1] = y
    return out
