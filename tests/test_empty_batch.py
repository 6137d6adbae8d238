"""An empty batch (B = 0) gives a zero loss and zero gradients, the same on every backend, for both ops."""
import pytest
import torch

import kc_kernels

BACKENDS = [name for name, ok in kc_kernels.backends().items() if ok]
DEVICE = {"reference": "cpu", "cpu": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu",
          "cuda": "cuda", "portable": "cpu"}


def _leaf(t, device):
    return t.to(device).requires_grad_()


def _check(loss, reduction, inputs):
    assert loss.dtype == torch.float32
    if reduction == "none":
        assert loss.shape == (0,)
    else:
        assert loss.shape == () and loss.item() == 0.0
    loss.sum().backward()
    for name, t in inputs.items():
        assert t.grad is not None, name
        g = t.grad.to_dense() if t.grad.is_sparse else t.grad
        assert g.shape == t.shape and g.dtype == t.dtype and not g.any(), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,targets", [("sigmoid", "sparse"), ("softmax", "dense"), ("softmax", "sparse")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("given_logits", [False, True])
def test_soft_target_loss_of_an_empty_batch(backend, mode, targets, reduction, given_logits):
    dev = DEVICE[backend]
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(0, 6), torch.randn(10, 6, generator=g), torch.randn(10, generator=g)
    scale = torch.rand(2, generator=g) + 0.5
    kw = dict(mode=mode, segments=[0, 4, 10], reduction=reduction, backend=backend,
              sample_weight=torch.ones(0, device=dev))
    if targets == "sparse":
        kw.update(target_index=torch.zeros(0, 3, dtype=torch.long, device=dev), target_value=torch.zeros(0, 3,
                                                                                                         device=dev))
    else:
        kw["teacher_logits"] = torch.zeros(0, 10, device=dev)
    if given_logits:
        inputs = {"logits": _leaf(torch.randn(0, 10), dev), "scale": _leaf(scale, dev)}
        loss = kc_kernels.soft_target_loss(inputs["logits"], scale=inputs["scale"], **kw)
    else:
        inputs = {"x": _leaf(x, dev), "weight": _leaf(w, dev), "bias": _leaf(b, dev), "scale": _leaf(scale, dev)}
        loss = kc_kernels.linear_soft_target_loss(inputs["x"], inputs["weight"], inputs["bias"],
                                                  scale=inputs["scale"], **kw)
    _check(loss, reduction, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_sampled_softmax_of_an_empty_batch(backend, reduction, sparse_grad):
    if sparse_grad and backend in ("reference", "portable"):
        pytest.skip("the reference backend returns dense gradients (portable runs the reference sampled softmax)")
    dev = DEVICE[backend]
    g = torch.Generator().manual_seed(1)
    inputs = {"x": _leaf(torch.randn(0, 6), dev), "weight": _leaf(torch.randn(10, 6, generator=g), dev),
              "bias": _leaf(torch.randn(10, generator=g), dev)}
    labels = torch.zeros(0, 2, dtype=torch.long, device=dev)
    sampled = (torch.tensor([1, 3, 7], device=dev), torch.ones(0, 2, device=dev, dtype=torch.float64),
               torch.ones(3, device=dev, dtype=torch.float64))
    loss = kc_kernels.sampled_softmax_loss(inputs["x"], inputs["weight"], inputs["bias"], labels, sampled=sampled,
                                           reduction=reduction, sparse_grad=sparse_grad, backend=backend)
    _check(loss, reduction, inputs)
