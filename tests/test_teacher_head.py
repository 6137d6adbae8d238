"""The fused teacher head: teacher_x [B, Ht] and teacher_weight [V, Ht] (and teacher_bias) in place of the
teacher's [B, V] logits, which the chunked driver computes one chunk at a time. Equal to the op given the head's
logits (the reference, in float64), in both base modes, grouped, with long segments walked in row blocks; the
teacher gets no gradient; bad heads are refused naming the argument."""
import pytest
import torch

import kc_kernels
from kc_kernels import reference


def _case(B=11, H=16, V=900, Ht=20, seed=0, grouped_G=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xs = (B, grouped_G, H) if grouped_G else (B, H)
    txs = (B, grouped_G, Ht) if grouped_G else (B, Ht)
    x = torch.randn(*xs, generator=g, dtype=dtype)
    w = torch.randn(V, H, generator=g, dtype=dtype) / H ** 0.5 * 2
    b = torch.randn(V, generator=g, dtype=dtype) * 0.3
    tx = torch.randn(*txs, generator=g, dtype=dtype)
    tw = torch.randn(V, Ht, generator=g, dtype=dtype) / Ht ** 0.5 * 2
    tb = torch.randn(V, generator=g, dtype=dtype) * 0.3
    return x, w, b, tx, tw, tb


CASES = [  # (mode, segments, grouped, memory_budget, T)
    ("softmax", None, False, None, 2.0),
    ("softmax", [0, 100, 900], False, 11 * 4 * 300, 1.0),  # the 800-class segment in row blocks
    ("sigmoid", [0, 450, 900], False, None, 1.5),
    ("softmax", [0, 300, 900], True, None, 1.0),  # grouped x and teacher_x
    ("sigmoid", None, False, 11 * 4 * 256, 1.0),  # several chunks
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("mode,segments,grouped,budget,T", CASES)
def test_head_equals_the_op_given_its_logits(backend, mode, segments, grouped, budget, T):
    G = len(segments) - 1 if segments else None
    x, w, b, tx, tw, tb = _case(grouped_G=G if grouped else None)
    segs = torch.tensor(segments) if segments else None
    teacher = reference.teacher_head_logits(tx, tw, tb, segs)
    leaves64 = [t.clone().requires_grad_() for t in (x, w, b)]
    want = reference.linear_soft_target_loss(*leaves64, teacher_logits=teacher, mode=mode, segments=segs,
                                             temperature=T)
    g64 = torch.autograd.grad(want, leaves64)
    leaves = [t.float().requires_grad_() for t in (x, w, b)]
    thead = [t.float().requires_grad_() for t in (tx, tw, tb)]
    got = kc_kernels.linear_soft_target_loss(*leaves, teacher_x=thead[0], teacher_weight=thead[1],
                                             teacher_bias=thead[2], mode=mode, segments=segments, temperature=T,
                                             backend=backend, memory_budget=budget)
    grads = torch.autograd.grad(got, leaves + thead, allow_unused=True)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    for a, r in zip(grads[:3], g64):
        torch.testing.assert_close(a.double(), r, rtol=2e-5, atol=2e-5)
    assert all(gr is None for gr in grads[3:]), "the teacher gets no gradient"


def test_bf16_head_on_the_cpu_backend():
    x, w, b, tx, tw, tb = _case(seed=3, dtype=torch.float32)
    want = kc_kernels.linear_soft_target_loss(x, w, b, teacher_logits=tx.bfloat16().float() @ tw.bfloat16().float().t()
                                              + tb.bfloat16().float(), mode="softmax", backend="reference")
    got = kc_kernels.linear_soft_target_loss(x, w, b, teacher_x=tx.bfloat16(), teacher_weight=tw.bfloat16(),
                                             teacher_bias=tb.bfloat16(), mode="softmax", backend="cpu")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("change,name", [
    (dict(teacher_weight=None), "teacher_weight"),
    (dict(teacher_x=None), "teacher_x"),
    (dict(teacher_logits=torch.zeros(11, 900)), "teacher_x"),
    (dict(teacher_weight=torch.zeros(899, 20)), "teacher_weight"),
    (dict(teacher_weight=torch.zeros(900, 19)), "teacher_weight"),
    (dict(teacher_x=torch.zeros(10, 20)), "teacher_x"),
    (dict(teacher_bias=torch.zeros(5)), "teacher_bias"),
    (dict(teacher_x=torch.full((11, 20), float("nan"))), "teacher_x"),
    (dict(teacher_weight=torch.zeros(900, 20, dtype=torch.float64)), "teacher_weight"),
])
def test_a_bad_head_is_refused_naming_the_argument(change, name):
    x, w, b, tx, tw, tb = _case(dtype=torch.float32)
    kw = dict(teacher_x=tx, teacher_weight=tw, teacher_bias=tb, mode="softmax")
    kw.update(change)
    kw = {k: v for k, v in kw.items() if v is not None}
    with pytest.raises(ValueError, match=f"^{name}: "):
        kc_kernels.linear_soft_target_loss(x, w, b, **kw)
