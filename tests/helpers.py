"""Shared test helpers: problem builders, brute-force definitions and relative-error asserts."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

# (rtol, atol) of a backend's result against the float64 reference, per input dtype
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-4, 2e-5),
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (5e-2, 1e-2),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(actual, expected, dtype=torch.float64, what="value", scale=1.0):
    """Element-wise closeness with the dtype's tolerance; the message reports the relative error."""
    rtol, atol = TOLERANCES[dtype]
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = atol * scale * max(1.0, expected.abs().max().item() if expected.numel() else 1.0)
    ok = torch.allclose(actual, expected, rtol=rtol, atol=tol)
    assert ok, (f"{what}: max abs err {(actual - expected).abs().max().item():.3e}, "
                f"rel err {rel_err(actual, expected):.3e} (rtol {rtol}, atol {tol:.1e})")


def make_problem(B, H, V, *, G=None, K=3, grouped=False, dtype=torch.float64, gen=None, scale_kind=None,
                 target_form="sparse", bias=True, sample_weight=False, logit_scale=1.0, device="cpu"):
    """Random inputs of linear_soft_target_loss as a dict of keyword arguments (plus x, weight, bias)."""
    g = gen or torch.Generator().manual_seed(0)
    if G is None:
        bounds = None
        nseg = 1
    else:
        cuts = sorted(torch.randperm(V - 1, generator=g)[: G - 1].add(1).tolist())
        bounds = [0, *cuts, V]
        nseg = G
    x = torch.randn(B, nseg, H, generator=g) if grouped else torch.randn(B, H, generator=g)
    x = x * logit_scale
    w = torch.randn(V, H, generator=g) / math.sqrt(H)
    kw = dict(x=x.to(dtype), weight=w.to(dtype))
    kw["bias"] = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    if target_form == "sparse":
        idx = torch.randint(-1, V, (B, K), generator=g)
        kw["target_index"] = idx
        kw["target_value"] = torch.rand(B, K, generator=g).to(dtype)
    else:
        kw["teacher_logits"] = (torch.randn(B, V, generator=g) * 2).to(dtype)
    if bounds is not None:
        kw["segments"] = torch.tensor(bounds)
    if scale_kind == "segment":
        kw["scale"] = (torch.rand(nseg, generator=g) * 3 + 0.5).to(dtype)
    elif scale_kind == "class":
        kw["scale"] = (torch.rand(V, generator=g) * 3 + 0.5).to(dtype)
    if sample_weight:
        kw["sample_weight"] = torch.rand(B, generator=g).to(dtype)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def brute_force_soft_target(x, weight, bias=None, *, target_index=None, target_value=None, teacher_logits=None,
                            mode="sigmoid", segments=None, scale=None, temperature=1.0, sample_weight=None,
                            reduction="mean"):
    """The op's definition (docs/ops.md), written as scalar loops (tiny sizes only); differentiable through torch
    ops."""
    B, V = x.shape[0], weight.shape[0]
    H = x.shape[-1]
    bounds: Sequence[int] = [0, V] if segments is None else [int(s) for s in segments]
    G = len(bounds) - 1
    seg_of = [g for g in range(G) for _ in range(bounds[g], bounds[g + 1])]
    T = temperature
    rows = []
    for r in range(B):
        u = []
        for j in range(V):
            xv = x[r, seg_of[j]] if x.dim() == 3 else x[r]
            acc = sum(xv[h] * weight[j, h] for h in range(H))
            u.append(acc)
        y = []
        for j in range(V):
            if scale is None:
                yj = u[j]
            else:
                g = seg_of[j]
                nrm = torch.sqrt(sum(u[i] ** 2 for i in range(bounds[g], bounds[g + 1])) + 1e-12)
                gam = scale[g] if scale.numel() == G else scale[j]
                yj = gam * u[j] / nrm
            if bias is not None:
                yj = yj + bias[j]  # the class prior sits outside the normalisation
            y.append(yj / T)
        z = [0.0] * V
        if target_index is not None:
            for k in range(target_index.shape[1]):
                j = int(target_index[r, k])
                if j >= 0:
                    z[j] = z[j] + float(target_value[r, k])
        elif mode == "sigmoid":
            z = [1.0 / (1.0 + math.exp(-float(teacher_logits[r, j]) / T)) for j in range(V)]
        else:
            for g in range(G):
                e = [math.exp(float(teacher_logits[r, j]) / T) for j in range(bounds[g], bounds[g + 1])]
                s = sum(e)
                for off, j in enumerate(range(bounds[g], bounds[g + 1])):
                    z[j] = e[off] / s
        if mode == "sigmoid":
            loss = sum(torch.log1p(torch.exp(y[j])) - z[j] * y[j] for j in range(V))
        else:
            loss = 0.0
            for g in range(G):
                js = range(bounds[g], bounds[g + 1])
                mass = sum(z[j] for j in js)
                lse = torch.log(sum(torch.exp(y[j]) for j in js))
                loss = loss + mass * lse - sum(z[j] * y[j] for j in js)
            loss = T * T * loss
        if sample_weight is not None:
            loss = loss * sample_weight[r]
        rows.append(loss)
    per_row = torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in rows])
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.sum() / B


def grads(loss: torch.Tensor, tensors: Sequence[Optional[torch.Tensor]]):
    live = [t for t in tensors if t is not None and t.requires_grad]
    if loss.dim():
        loss = (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)).sum()
    gs = torch.autograd.grad(loss, live, allow_unused=True)
    out, it = [], iter(gs)
    for t in tensors:
        out.append(next(it) if t is not None and t.requires_grad else None)
    return out
