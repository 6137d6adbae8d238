"""One student training step at the paper's head shape: MLP backbone, self-paced FC head over 20 verticals, the
fused sigmoid soft-target loss against K=100 teacher targets plus the hard label, and an SGD update."""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import nn

import kc_kernels
from benchmarks import common


def make_student_step(B: int, H: int, V: int, device, dtype, features: int = 256, verticals: int = 20,
                      K: int = 100) -> Tuple[Callable[[], torch.Tensor], Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    backbone = nn.Sequential(nn.Linear(features, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU()).to(device, dtype)
    head = nn.Linear(H, V).to(device, dtype)
    segments = torch.linspace(0, V, verticals + 1).round().long().to(device)
    scale = nn.Parameter(torch.diff(segments).float().sqrt().to(device))
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters(), scale], lr=0.01)
    feats = torch.randn(B, features, generator=g).to(device, dtype)
    idx = torch.cat([torch.randint(0, V, (B, K), generator=g), torch.randint(0, V, (B, 1), generator=g)], 1)
    val = torch.cat([torch.rand(B, K, generator=g), torch.ones(B, 1)], 1)
    idx, val = idx.to(device), val.to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = kc_kernels.linear_soft_target_loss(backbone(feats), head.weight, head.bias, target_index=idx,
                                                  target_value=val, segments=segments, scale=scale)
        loss.backward()
        opt.step()
        return loss.detach()

    return step, step_floor(feats, backbone, head)


def step_floor(feats: torch.Tensor, backbone: nn.Sequential, head: nn.Linear) -> Callable[[], object]:
    """The GEMMs of one step, on reused buffers: the backbone's forward, its backward (dW of every layer, dx of all
    but the first) and the head's three (logits, dx, dW over all classes). Everything else a step does (the
    loss, activations, the optimiser update) is what an implementation adds to this floor."""
    layers = [m.weight.detach() for m in backbone if isinstance(m, nn.Linear)]
    acts = [feats]
    for w in layers:
        acts.append(torch.empty(feats.shape[0], w.shape[0], dtype=feats.dtype, device=feats.device))
    head_floor = common.floor_fn(common.Problem(acts[-1], head.weight.detach(), head.bias.detach()))
    grads = [torch.empty_like(a) for a in acts]
    dws = [torch.empty_like(w) for w in layers]

    def run():
        for i, w in enumerate(layers):
            torch.mm(acts[i], w.t(), out=acts[i + 1])
        head_floor()
        for i in reversed(range(len(layers))):
            torch.mm(grads[i + 1].t(), acts[i], out=dws[i])
            if i > 0:
                torch.mm(grads[i + 1], layers[i], out=grads[i])
        return None

    return run
