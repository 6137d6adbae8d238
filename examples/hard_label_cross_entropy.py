"""Hard-label cross-entropy in place of ``nn.Linear`` + ``F.cross_entropy``.

A label is a sparse soft target of weight 1: ``target_index=labels[:, None]``, ``target_value=ones``, in softmax
mode. The fused op gives the same loss and gradients as the two-step eager form without the [batch, classes]
logits; this script checks that on one batch, then trains a linear classifier on a synthetic task with it.

    python examples/hard_label_cross_entropy.py [--classes 20000] [--steps 50]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import kc_kernels


def fused_cross_entropy(x: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    ones = torch.ones(labels.shape[0], 1, dtype=torch.float32, device=labels.device)
    return kc_kernels.linear_soft_target_loss(x, head.weight, head.bias, target_index=labels[:, None],
                                              target_value=ones, mode="softmax")


def check_against_eager(head: nn.Linear, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Largest difference of loss and weight gradient between the fused and the eager form."""
    fused = fused_cross_entropy(x, head, labels)
    (dw_fused,) = torch.autograd.grad(fused, head.weight)
    eager = F.cross_entropy(head(x), labels)
    (dw_eager,) = torch.autograd.grad(eager, head.weight)
    return max(abs(float(fused - eager)), float((dw_fused - dw_eager).abs().max()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    centers = torch.randn(args.classes, args.dim)  # class c's inputs scatter around centers[c]
    head = nn.Linear(args.dim, args.classes)
    labels = torch.randint(0, args.classes, (args.batch,))
    diff = check_against_eager(head, centers[labels] + 0.3 * torch.randn(args.batch, args.dim), labels)
    print(f"fused vs eager cross-entropy: largest difference {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("fused and eager cross-entropy differ")
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for step in range(args.steps):
        labels = torch.randint(0, args.classes // 10, (args.batch,))  # a tenth of the classes: visible progress
        loss = fused_cross_entropy(centers[labels] + 0.3 * torch.randn(args.batch, args.dim), head, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {float(loss):.4f}")


if __name__ == "__main__":
    main()
