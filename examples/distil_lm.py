"""Distil a causal language model into a smaller one with the fused teacher head: neither model's logits are held.

A teacher LM (a randomly initialised LlamaForCausalLM from transformers, or a small PyTorch LM where transformers
is not installed) is distilled into a student with half its width and depth on synthetic token data. Each step
runs both bodies, then one call

    kc_kernels.linear_soft_target_loss(h_student, student.lm_head.weight,
                                       teacher_x=h_teacher, teacher_weight=teacher.lm_head.weight,
                                       mode="jsd", beta=0.5, temperature=2.0)

computes the divergence between the two next-token distributions chunk by chunk over the vocabulary: the student's
and the teacher's logits ([tokens, V] each) exist only one class chunk at a time, and the teacher gets no gradient.
The first step is checked against the same divergence written in eager PyTorch over the full logits.

    python examples/distil_lm.py [--vocab 2000] [--steps 30] [--mode jsd|kl|reverse_kl] [--temperature 2]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import kc_kernels

Body = Callable[[torch.Tensor], torch.Tensor]


class TinyLM(nn.Module):
    """Embedding, a causal convolution over the last few tokens, an MLP and an output layer (no transformers)."""

    def __init__(self, vocab: int, dim: int, layers: int, context: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.context = context
        self.mix = nn.ModuleList(nn.Conv1d(dim, dim, context, padding=context - 1) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def body(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).transpose(1, 2)  # [B, D, T]
        for conv in self.mix:  # causal: position t sees tokens <= t
            h = h + F.gelu(conv(h)[..., :tokens.shape[1]])
        return self.norm(h.transpose(1, 2))  # [B, T, D]


def make_lm(vocab: int, dim: int, layers: int, use_transformers: bool) -> Tuple[nn.Module, Body, nn.Linear]:
    """A model, the function giving its last hidden states [B, T, dim], and its output layer."""
    if use_transformers:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        lm = LlamaForCausalLM(cfg)
        return lm, (lambda tokens: lm.model(tokens).last_hidden_state), lm.lm_head
    tiny = TinyLM(vocab, dim, layers)
    return tiny, tiny.body, tiny.lm_head


def eager_divergence(hs, ws, ht, wt, mode: str, beta: float, temperature: float) -> torch.Tensor:
    """The same loss over the full [tokens, V] logits: the mean over tokens of T^2 D(teacher, student)."""
    log_q = F.log_softmax(hs @ ws.T / temperature, dim=-1)  # student
    log_p = F.log_softmax(ht @ wt.T / temperature, dim=-1)  # teacher
    if mode == "kl":
        d = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif mode == "reverse_kl":
        d = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + torch.log(torch.tensor(beta, dtype=log_p.dtype)),
                                             log_q + torch.log1p(torch.tensor(-beta, dtype=log_q.dtype))]), dim=0)
        d = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
    return temperature ** 2 * d.mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--teacher-dim", type=int, default=128)
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--mode", choices=("jsd", "kl", "reverse_kl"), default="jsd")
    ap.add_argument("--beta", type=float, default=0.5, help="the jsd mode's weight of the teacher")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--no-transformers", action="store_true", help="use the small PyTorch LM even if transformers "
                                                                   "is installed")
    ap.add_argument("--backend", default="auto", help="kc backend (auto, cpu, portable, ...)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    use_tf = not args.no_transformers
    if use_tf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            use_tf = False
    teacher, teacher_body, teacher_head = make_lm(args.vocab, args.teacher_dim, args.teacher_layers, use_tf)
    student, student_body, student_head = make_lm(args.vocab, args.teacher_dim // 2,
                                                  max(1, args.teacher_layers // 2), use_tf)
    with torch.no_grad():  # a confident teacher: a random one at the usual init is close to uniform
        teacher_head.weight.normal_(0.0, 3.0 / args.teacher_dim ** 0.5)
    teacher.eval().requires_grad_(False)
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    print(f"{'LlamaForCausalLM' if use_tf else 'TinyLM'}: teacher {n_teacher / 1e6:.2f}M parameters, "
          f"student {n_student / 1e6:.2f}M; vocabulary {args.vocab}; mode {args.mode}, T={args.temperature}")

    gen = torch.Generator().manual_seed(args.seed + 1)
    data = torch.randint(0, args.vocab, (4, args.batch, args.seq), generator=gen)  # 4 batches, cycled
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    kw = dict(mode=args.mode, temperature=args.temperature, backend=args.backend)
    if args.mode == "jsd":
        kw["beta"] = args.beta

    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        tokens = data[step % data.shape[0]]
        with torch.no_grad():
            ht = teacher_body(tokens).reshape(-1, args.teacher_dim)
        hs = student_body(tokens)
        hs = hs.reshape(-1, hs.shape[-1])
        loss = kc_kernels.linear_soft_target_loss(hs, student_head.weight, student_head.bias, teacher_x=ht,
                                                  teacher_weight=teacher_head.weight,
                                                  teacher_bias=teacher_head.bias, **kw)
        if step == 0:
            eager = eager_divergence(hs.detach().double(), student_head.weight.detach().double(), ht.double(),
                                     teacher_head.weight.double(), args.mode, args.beta, args.temperature)
            print(f"first step: fused {loss.item():.6f}, eager {eager.item():.6f}, "
                  f"largest difference {abs(loss.item() - eager.item()):.2e}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    took = time.perf_counter() - t0
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps ({took:.1f} s)")


if __name__ == "__main__":
    main()
