"""kc_kernels.linear_distillation_loss: weight_hard * CE + weight_soft * divergence per row, averaged over the rows
whose label is not ignored, against the same composition of the float64 definitions."""
import pytest
import torch

import kc_kernels
from kc_kernels import reference


def _case(B, H, V, Ht, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, generator=g, dtype=dtype)
    w = torch.randn(V, H, generator=g, dtype=dtype) / H ** 0.5 * 2
    b = torch.randn(V, generator=g, dtype=dtype) * 0.1
    tx = torch.randn(B, Ht, generator=g, dtype=dtype)
    tw = torch.randn(V, Ht, generator=g, dtype=dtype) / Ht ** 0.5 * 2
    lab = torch.randint(0, V, (B,), generator=g)
    lab[::4] = -100
    return x, w, b, tx, tw, lab


def _expected(x, w, b, tx, tw, lab, mode, beta, T, wh, ws, reduction):
    valid = (lab != -100).to(x.dtype)
    ce = reference.linear_cross_entropy(x, w, b, labels=lab, reduction="none")
    soft = reference.linear_soft_target_loss(x, w, b, teacher_x=tx, teacher_weight=tw, mode=mode, beta=beta,
                                             temperature=T, reduction="none") * valid
    rows = wh * ce + ws * soft
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / valid.sum()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mode,beta", [("kl", 0.5), ("softmax", 0.5), ("jsd", 0.3), ("reverse_kl", 0.5)])
@pytest.mark.parametrize("T,reduction", [(1.0, "mean"), (2.0, "mean"), (1.0, "none")])
def test_matches_the_composition_of_the_definitions(backend, mode, beta, T, reduction):
    x, w, b, tx, tw, lab = _case(12, 16, 333, 20, seed=7)
    leaves64 = [t.clone().requires_grad_() for t in (x, w, b)]
    want = _expected(*leaves64, tx, tw, lab, mode, beta, T, 0.3, 0.7, reduction)
    g64 = torch.autograd.grad(want.sum(), leaves64)
    leaves = [t.float().requires_grad_() for t in (x, w, b)]
    got = kc_kernels.linear_distillation_loss(*leaves, lab, teacher_x=tx.float(), teacher_weight=tw.float(),
                                              mode=mode, beta=beta, temperature=T, weight_hard=0.3,
                                              weight_soft=0.7, reduction=reduction, backend=backend)
    grads = torch.autograd.grad(got.sum(), leaves)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    for a, r in zip(grads, g64):
        torch.testing.assert_close(a.double(), r, rtol=2e-5, atol=2e-5)


def test_parts_add_up_and_ignored_rows_count_in_neither():
    x, w, b, tx, tw, lab = _case(8, 8, 100, 8, seed=1, dtype=torch.float32)
    loss, hard, soft = kc_kernels.linear_distillation_loss(x, w, b, lab, teacher_x=tx, teacher_weight=tw,
                                                           reduction="none", return_parts=True, backend="reference")
    torch.testing.assert_close(loss, hard + soft)
    assert bool((loss[lab == -100] == 0).all()) and bool((loss[lab != -100] > 0).all())


@pytest.mark.parametrize("kwargs,name", [(dict(mode="sigmoid"), "mode"), (dict(weight_hard=-1.0), "weight_hard"),
                                         (dict(weight_soft=float("nan")), "weight_soft"),
                                         (dict(labels=torch.zeros(3, dtype=torch.long)), "labels")])
def test_bad_arguments_name_themselves(kwargs, name):
    x, w, b, tx, tw, lab = _case(4, 8, 100, 8, seed=2, dtype=torch.float32)
    kw = dict(labels=lab, teacher_x=tx, teacher_weight=tw)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=f"^{name}: "):
        kc_kernels.linear_distillation_loss(x, w, b, **kw)


@pytest.mark.parametrize("mode", ["kl", "softmax"])
@pytest.mark.parametrize("budget", [None, 12 * 4 * 256], ids=["one-chunk", "row-blocks"])
@pytest.mark.parametrize("bias", [True, False])
def test_temperature_one_runs_both_terms_in_one_walk(monkeypatch, mode, budget, bias):
    """At T = 1 with softmax/kl the cpu backend walks the classes once (the hard term's mass rides on the soft
    term's walk, its label's -1 is added before the gradient GEMMs), with the same values and gradients."""
    from kc_kernels import driver

    walks = []
    real = driver.Sweep.run
    monkeypatch.setattr(driver.Sweep, "run", lambda self, *a, **k: walks.append(1) or real(self, *a, **k))
    x, w, b, tx, tw, lab = _case(12, 16, 1001, 20, seed=11)
    if not bias:
        b = None
    leaves64 = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    want = _expected(*(leaves64 if bias else leaves64 + [None]), tx, tw, lab, mode, 0.5, 1.0, 0.4, 0.6, "mean")
    g64 = torch.autograd.grad(want, leaves64)
    leaves = [t.float().requires_grad_() for t in leaves64]
    got = kc_kernels.linear_distillation_loss(*(leaves if bias else leaves + [None]), lab, teacher_x=tx.float(),
                                              teacher_weight=tw.float(), mode=mode, weight_hard=0.4,
                                              weight_soft=0.6, backend="cpu", memory_budget=budget)
    grads = torch.autograd.grad(got, leaves)
    assert len(walks) == 1
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    for a, r in zip(grads, g64):
        torch.testing.assert_close(a.double(), r, rtol=2e-5, atol=2e-5)
