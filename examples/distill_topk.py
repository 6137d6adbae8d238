"""Distil a small language model from cached top-K teacher logits with the fused op in softmax mode.

Distillation frameworks keep only the teacher's K most likely next tokens per position (the full distribution is
V floats a token) and train the student on the renormalised top-K probabilities. Here a teacher (a larger random
next-token model) is run once over the corpus and its top-K cached; the student's output layer and loss are then
one call, ``linear_soft_target_loss(h, head.weight, target_index=topk_ids, target_value=topk_probs,
mode="softmax")``, which never holds the [tokens, vocabulary] logits. The same step is timed against the eager loss
(logits, log_softmax, gather), whose logits and their gradient are 2 x tokens x V floats.

    python examples/distill_topk.py [--vocab 16000] [--steps 20] [--topk 32]
"""
from __future__ import annotations

import argparse
import time
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

import kc_kernels


class TinyLM(nn.Module):
    """Embedding, a causal mixing of the last few tokens, an MLP: the hidden state of the next-token head."""

    def __init__(self, vocab: int, dim: int, context: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Conv1d(dim, dim, context, padding=context - 1)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Linear(dim, vocab, bias=False)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens).transpose(1, 2)  # [B, D, T]
        h = self.mix(e)[..., :tokens.shape[1]].transpose(1, 2)  # causal: position t sees tokens <= t
        return self.mlp(h).reshape(-1, e.shape[1])  # [B * T, D]


@torch.no_grad()
def cache_topk(teacher: TinyLM, tokens: torch.Tensor, k: int, temperature: float) -> Tuple[torch.Tensor, ...]:
    """The teacher's top-K next-token ids and their probabilities renormalised over the K (the cache)."""
    logits = teacher.head(teacher.hidden(tokens)) / temperature
    top, ids = logits.topk(k, dim=1)
    return ids, torch.softmax(top, dim=1)


def fused_loss(student: TinyLM, tokens, ids, probs) -> torch.Tensor:
    h = student.hidden(tokens)
    return kc_kernels.linear_soft_target_loss(h, student.head.weight, target_index=ids, target_value=probs,
                                              mode="softmax")


def eager_loss(student: TinyLM, tokens, ids, probs) -> torch.Tensor:
    logp = F.log_softmax(student.head(student.hidden(tokens)).float(), dim=1)
    return -(probs * logp.gather(1, ids)).sum(dim=1).mean()


def timed_steps(loss_fn, student, batches, lr: float) -> Tuple[float, float]:
    """(final loss, seconds per step) of SGD steps over ``batches``."""
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    start, loss = time.perf_counter(), None
    for tokens, ids, probs in batches:
        opt.zero_grad()
        loss = loss_fn(student, tokens, ids, probs)
        loss.backward()
        opt.step()
    return float(loss.detach()), (time.perf_counter() - start) / len(batches)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=2.0)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    teacher = TinyLM(args.vocab, 2 * args.dim)
    corpus = torch.randint(0, args.vocab, (args.steps, args.batch, args.seq))
    batches = [(t,) + cache_topk(teacher, t, args.topk, args.temperature) for t in corpus]
    first = TinyLM(args.vocab, args.dim)
    losses = {}
    for name, fn in (("fused", fused_loss), ("eager", eager_loss)):
        student = TinyLM(args.vocab, args.dim)
        student.load_state_dict(first.state_dict())  # both start from the same weights
        with torch.no_grad():
            initial = float(fn(student, *batches[0]))
        losses[name] = (initial,) + timed_steps(fn, student, batches, lr=0.5)
    tokens = args.batch * args.seq
    logits_mib = 2 * tokens * args.vocab * 4 / 2**20  # fp32 logits and their gradient
    print(f"tokens per step {tokens}, vocabulary {args.vocab}, top-{args.topk} cached targets")
    for name, (initial, final, sec) in losses.items():
        print(f"{name:6s} loss {initial:.4f} -> {final:.4f}   {1000 * sec:.1f} ms/step")
    print(f"eager holds {logits_mib:.1f} MiB of logits and logit gradient per step; the fused op one class chunk "
          f"(cpu default budget 64 MiB, smaller when the vocabulary is)")
    if abs(losses["fused"][0] - losses["eager"][0]) > 1e-3 * max(1.0, losses["eager"][0]):
        raise SystemExit("fused and eager losses differ")


if __name__ == "__main__":
    main()
