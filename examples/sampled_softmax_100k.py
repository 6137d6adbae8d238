"""Sampled softmax for a 100K-class output layer.

Each step scores the true classes and ``num_sampled`` negatives shared by the batch, drawn from a log-uniform
(Zipf) distribution as TensorFlow's ``sampled_softmax_loss`` does; the full softmax over 100,000 classes is only
evaluated to report progress. Class frequencies follow the same Zipf law, which is what the sampler assumes.

    python examples/sampled_softmax_100k.py [--classes 100000] [--steps 40] [--num-sampled 1024]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import kc_kernels


def zipf_labels(n: int, classes: int, generator: torch.Generator) -> torch.Tensor:
    """Labels with P(c) proportional to log((c + 2) / (c + 1)): the log-uniform sampler's own distribution."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return (torch.exp(u * torch.log(torch.tensor(classes + 1.0))) - 1).long().clamp_(0, classes - 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=100000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--num-sampled", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    centers = torch.randn(args.classes, args.dim, generator=g)
    head = nn.Linear(args.dim, args.classes)
    loss_fn = kc_kernels.SampledSoftmaxLoss(args.num_sampled, sampler="log_uniform", seed=0)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)

    def batch():
        labels = zipf_labels(args.batch, args.classes, g)
        return centers[labels] + 0.3 * torch.randn(args.batch, args.dim, generator=g), labels

    x_eval, y_eval = batch()
    with torch.no_grad():
        before = float(F.cross_entropy(head(x_eval), y_eval))
    start = time.perf_counter()
    for _ in range(args.steps):
        x, labels = batch()
        loss = loss_fn(x, head.weight, head.bias, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sec = (time.perf_counter() - start) / args.steps
    with torch.no_grad():
        after = float(F.cross_entropy(head(x_eval), y_eval))
    print(f"{args.classes} classes, {args.num_sampled} sampled negatives: {1000 * sec:.1f} ms/step")
    print(f"full softmax cross-entropy on held-out rows: {before:.3f} -> {after:.3f}")
    if not after < before:
        raise SystemExit("training did not lower the full softmax loss")


if __name__ == "__main__":
    main()
