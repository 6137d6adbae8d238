"""The distillation cases of kc's benchmarks: a student's fused loss against a teacher head, and hard-label
cross-entropy with the LLM options.

- teacher-head cases (modes kl and jsd): the student's head x [B, H] -> V classes and the teacher's head
  tx [B, Ht] -> V classes. Floor: the four GEMMs no fused implementation avoids (student logits, teacher logits,
  dx, dW) into buffers reused across calls. Peers: Liger-Kernel's chunked distillation loss
  (LigerFusedLinearJSDLoss, plain PyTorch, so it runs on the CPU), eager PyTorch (both heads' [B, V] logits, then
  the divergence), and kc given the teacher's logits (the teacher GEMM then runs outside the op, counted in the row).
- cross-entropy cases: kc.linear_cross_entropy plain and with label smoothing, z-loss and soft-capping, against the
  three-GEMM floor.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

import kc_kernels
from benchmarks import common
from kc_kernels import layout

DEFAULT_SHAPE = "1024,512,100000,512"  # B, H, V, Ht: the shape of the Liger comparison, teacher as wide


def parse_shape(text: str) -> Tuple[int, int, int, int]:
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"--distill-shape: expected four positive integers B,H,V,Ht, got {text!r}")
    B, H, V, Ht = (int(p) for p in parts)
    return B, H, V, Ht


class Heads:
    """Inputs of one teacher-head case."""

    def __init__(self, B: int, H: int, V: int, Ht: int, device, dtype, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = (torch.randn(B, H, generator=g) / math.sqrt(H)).to(device, dtype).requires_grad_()
        self.w = (torch.randn(V, H, generator=g) * 0.05).to(device, dtype).requires_grad_()
        self.tx = (torch.randn(B, Ht, generator=g) / math.sqrt(Ht)).to(device, dtype)
        self.tw = (torch.randn(V, Ht, generator=g) * 0.08).to(device, dtype)
        self.labels = torch.randint(0, V, (B,), generator=g).to(device)

    def clear(self) -> None:
        common.zero_grads(self.x, self.w)


def floor4_fn(h: Heads) -> Callable[[], object]:
    """The four GEMMs of a fused distillation loss with a teacher head, on reused buffers."""
    x, w, tx, tw = h.x.detach(), h.w.detach(), h.tx, h.tw
    V = w.shape[0]
    ld = layout.padded_row_stride(V, x.element_size())
    s = torch.zeros(x.shape[0], ld, dtype=x.dtype, device=x.device)[:, :V]
    t = torch.zeros(x.shape[0], ld, dtype=x.dtype, device=x.device)[:, :V]
    dx, dw = torch.empty_like(x), torch.empty_like(w)

    def run():
        torch.mm(x, w.t(), out=s)
        torch.mm(tx, tw.t(), out=t)
        torch.mm(s, w, out=dx)
        torch.mm(s.t(), x, out=dw)

    return run


def kc_head_fn(h: Heads, mode: str, beta: float, T: float, backend: str) -> Callable[[], object]:
    def run():
        h.clear()
        kc_kernels.linear_soft_target_loss(h.x, h.w, teacher_x=h.tx, teacher_weight=h.tw, mode=mode, beta=beta,
                                           temperature=T, backend=backend).backward()
        return h.x.grad, h.w.grad

    return run


def kc_logits_fn(h: Heads, mode: str, beta: float, T: float, backend: str) -> Callable[[], object]:
    """kc handed the teacher's [B, V] logits (computed here, as a caller without the fused head would)."""
    def run():
        h.clear()
        t = h.tx @ h.tw.t()
        kc_kernels.linear_soft_target_loss(h.x, h.w, teacher_logits=t, mode=mode, beta=beta, temperature=T,
                                           backend=backend).backward()
        return h.x.grad, h.w.grad

    return run


def _divergence(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """Liger-Kernel's per-row generalized JSD of student and teacher logits (already divided by T)."""
    ls, lt = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    if beta == 0:
        return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), dim=0)
    return (beta * F.kl_div(lm, lt, reduction="none", log_target=True)
            + (1 - beta) * F.kl_div(lm, ls, reduction="none", log_target=True)).sum(-1)


def eager_fn(h: Heads, beta: float, T: float) -> Callable[[], object]:
    def run():
        h.clear()
        with torch.no_grad():
            t = (h.tx @ h.tw.t()).float() / T
        s = (h.x @ h.w.t()).float() / T
        (T * T * _divergence(s, t, beta).mean()).backward()
        return h.x.grad, h.w.grad

    return run


def liger_fn(h: Heads, beta: float, T: float) -> Optional[Callable[[], object]]:
    """Liger-Kernel's LigerFusedLinearJSDLoss (soft term only), where installed; its default compiled=True runs
    its chunk function through torch.compile."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=T)

    def run():
        h.clear()
        loss_fn(h.x, h.w, h.tx, h.tw, h.labels).backward()
        return h.x.grad, h.w.grad

    return run


def ce_fn(h: Heads, backend: str, **opts) -> Callable[[], object]:
    def run():
        h.clear()
        kc_kernels.linear_cross_entropy(h.x, h.w, None, h.labels, backend=backend, **opts).backward()
        return h.x.grad, h.w.grad

    return run


def run_distill(args, device, dtype, rows: List[common.Row], backends: List[str]) -> None:
    """The teacher-head and cross-entropy cases (benchmarks/__main__.py, part "distill")."""
    kc_names = [b for b in backends if b != "reference"]
    for B, H, V, Ht in [parse_shape(args.distill_shape)]:
        shape = f"B={B} H={H} V={V} Ht={Ht}"
        h = Heads(B, H, V, Ht, device, dtype)
        for mode, beta in (("kl", 0.0), ("jsd", 0.5)):
            T = 2.0
            impls: List[Tuple[str, Optional[Callable[[], object]]]] = []
            impls += [(f"kc-{b}", kc_head_fn(h, mode, beta, T, b)) for b in kc_names]
            impls += [(f"kc-{b}-given-logits", kc_logits_fn(h, mode, beta, T, b)) for b in kc_names]
            if "liger" in args.peers:
                impls.append(("liger-chunked-jsd", liger_fn(h, beta, T)))
            if "eager" in args.peers:
                impls.append(("torch-eager", eager_fn(h, beta, T)))
            case_rows = common.measure_interleaved(f"head-{mode}", shape, floor4_fn(h), impls, device, args.rounds,
                                                   {"liger-chunked-jsd": 2}, floor_name="gemm-floor(4)",
                                                   clear=h.clear)
            rows.extend(case_rows)
            print("\n".join(common.format_table(case_rows).splitlines()[2:]), flush=True)
        p = common.Problem(h.x, h.w, torch.zeros(V, dtype=dtype, device=device), labels=h.labels)
        for b in kc_names:
            impls = [(f"kc-{b}-ce", ce_fn(h, b)),
                     (f"kc-{b}-ce+extras", ce_fn(h, b, label_smoothing=0.1, z_loss=1e-4, softcap=30.0))]
            case_rows = common.measure_interleaved("hard-ce-options", f"B={B} H={H} V={V}", common.floor_fn(p),
                                                   impls, device, args.rounds, clear=h.clear)
            rows.extend(case_rows)
            print("\n".join(common.format_table(case_rows).splitlines()[2:]), flush=True)
        del h
