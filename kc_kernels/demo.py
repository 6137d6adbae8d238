"""A short demonstration of the op API: `python -m kc_kernels.demo`.

Builds a small distillation problem (sparse teacher soft targets plus hard labels over 20,000 classes in 8
segments), runs every available backend, and prints loss, gradient agreement with the reference, time and peak
memory.
"""
from __future__ import annotations

import argparse
import time

import torch

import kc_kernels


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--classes", type=int, default=20_000)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    B, H, V, K = args.batch, args.hidden, args.classes, args.topk
    x = torch.randn(B, H, generator=g) / H ** 0.5
    weight = torch.randn(V, H, generator=g) * 0.02
    bias = torch.zeros(V)
    segments = torch.linspace(0, V, 9).long()
    # teacher top-K soft targets inside the sample's segment, plus its hard label (duplicates add up)
    seg = torch.randint(0, 8, (B,), generator=g)
    lo, size = segments[seg], (segments[seg + 1] - segments[seg])
    idx = lo[:, None] + (torch.rand(B, K, generator=g) * size[:, None]).long()
    val = torch.rand(B, K, generator=g) * 0.5
    target_index = torch.cat([idx, idx[:, :1]], dim=1)
    target_value = torch.cat([val, torch.ones(B, 1)], dim=1)
    scale = torch.sqrt((segments[1:] - segments[:-1]).float())

    print("backends:", kc_kernels.backends())
    print(f"B={B} H={H} V={V} K={K}, sigmoid mode, 8 segments, self-paced scale per segment\n")
    ref_grads = None
    print(f"{'backend':<10} {'loss':>12} {'max |dx - ref|':>15} {'ms':>9}")
    for name, ok in kc_kernels.backends().items():
        if not ok:
            continue
        xs, ws, bs, ss = (t.clone().requires_grad_() for t in (x, weight, bias, scale))
        t0 = time.perf_counter()
        try:
            loss = kc_kernels.linear_soft_target_loss(xs, ws, bs, target_index=target_index,
                                                      target_value=target_value, segments=segments, scale=ss,
                                                      backend=name)
        except NotImplementedError:
            continue
        loss.backward()
        ms = (time.perf_counter() - t0) * 1e3
        if ref_grads is None:
            ref_grads = xs.grad
        err = (xs.grad - ref_grads).abs().max().item()
        print(f"{name:<10} {loss.item():>12.6f} {err:>15.3e} {ms:>9.1f}")

    labels = torch.randint(0, V, (B,), generator=g)
    ssm = kc_kernels.sampled_softmax_loss(x, weight, bias, labels, num_sampled=1024, generator=g)
    print(f"\nsampled softmax (1024 log-uniform negatives): {ssm.item():.6f}")


if __name__ == "__main__":
    main()
