"""kc_kernels.linear_cross_entropy: the hard-label cross-entropy with ignore_index, label smoothing, z-loss,
soft-capping and per-row log-sum-exps, against its float64 definition (kc_kernels.reference.cross_entropy_loss),
which is itself checked against torch.nn.functional.cross_entropy; and its argument checks."""
import pytest
import torch
import torch.nn.functional as F

import kc_kernels
from kc_kernels import reference

OPTIONS = [dict(), dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(softcap=3.0),
           dict(label_smoothing=0.2, z_loss=1e-2, softcap=5.0)]
BACKENDS = ["reference", "cpu", "portable"]


def _problem(B, H, V, seed, dtype=torch.float64, ignored=(1,)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, generator=g, dtype=dtype)
    w = torch.randn(V, H, generator=g, dtype=dtype) / H ** 0.5 * 3
    b = torch.randn(V, generator=g, dtype=dtype)
    lab = torch.randint(0, V, (B,), generator=g)
    for i in ignored:
        if i < B:
            lab[i] = -100
    return x, w, b, lab


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_is_torch_cross_entropy_with_smoothing_and_an_explicit_z_loss(reduction):
    x, w, b, lab = _problem(13, 8, 301, 0)
    y = x @ w.t() + b
    for eps, zl in ((0.0, 0.0), (0.1, 0.0), (0.1, 1e-3)):
        got = reference.cross_entropy_loss(y, lab, label_smoothing=eps, z_loss=zl, reduction=reduction)
        want = F.cross_entropy(y, lab, label_smoothing=eps, reduction="none")
        lse = torch.logsumexp(y, dim=1)
        want = torch.where(lab != -100, want + zl * lse * lse, torch.zeros_like(want))
        want = {"none": want, "sum": want.sum(), "mean": want.sum() / (lab != -100).sum()}[reduction]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("shape", [(9, 16, 700), (1, 8, 257), (33, 12, 1283)], ids=["B9", "B1", "V1283"])
def test_loss_lse_and_gradients_match_the_float64_definition(backend, opts, shape):
    B, H, V = shape
    x, w, b, lab = _problem(B, H, V, seed=B + V)
    leaves64 = [t.clone().requires_grad_() for t in (x, w, b)]
    ref, ref_z, ref_lse = reference.linear_cross_entropy(*leaves64, labels=lab, return_z_loss=True,
                                                         return_lse=True, **opts)
    g64 = torch.autograd.grad(ref, leaves64)
    leaves = [t.float().requires_grad_() for t in (x, w, b)]
    # a small budget walks the classes in several chunks (and row blocks)
    loss, zpart, lse = kc_kernels.linear_cross_entropy(*leaves, lab, return_z_loss=True, return_lse=True,
                                                       backend=backend, memory_budget=B * 4 * 300, **opts)
    grads = torch.autograd.grad(loss, leaves)
    tol = dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(loss.double(), ref, **tol)
    torch.testing.assert_close(zpart.double(), ref_z, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, **tol)
    for name, a, r in zip(("x", "weight", "bias"), grads, g64):
        torch.testing.assert_close(a.double(), r, **tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_keeps_the_labels_shape_and_ignored_rows_are_zero(backend):
    x, w, b, lab = _problem(12, 8, 300, 3, dtype=torch.float32, ignored=(0, 5))
    out = kc_kernels.linear_cross_entropy(x.view(3, 4, 8), w, b, lab.view(3, 4), reduction="none", backend=backend)
    assert out.shape == (3, 4)
    assert out.view(-1)[0] == 0 and out.view(-1)[5] == 0 and bool((out.view(-1)[1:5] > 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_ignored_gives_zero_not_nan(backend):
    x, w, b, lab = _problem(4, 8, 300, 4, dtype=torch.float32)
    lab[:] = -100
    w.requires_grad_()
    loss = kc_kernels.linear_cross_entropy(x, w, b, lab, backend=backend)
    (gw,) = torch.autograd.grad(loss, [w])
    assert loss.item() == 0.0 and bool((gw == 0).all())


@pytest.mark.parametrize("kwargs,name", [
    (dict(labels=torch.tensor([0, 300, 1, 2])), "labels"),
    (dict(labels=torch.tensor([0, 1, 2])), "labels"),
    (dict(labels=torch.tensor([0.0, 1, 2, 3])), "labels"),
    (dict(ignore_index=5), "ignore_index"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(z_loss=float("nan")), "z_loss"),
    (dict(softcap=0.0), "softcap"),
    (dict(reduction="avg"), "reduction"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    x, w, b, lab = _problem(4, 8, 300, 5, dtype=torch.float32, ignored=())
    kw = dict(labels=lab)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=f"^{name}: "):
        kc_kernels.linear_cross_entropy(x, w, b, **kw)
