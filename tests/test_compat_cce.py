"""kc_kernels.compat.linear_cross_entropy against Cut Cross-Entropy's own linear_cross_entropy (25.1.1), and
kc_kernels.linear_cross_entropy against torch.nn.functional.cross_entropy with label smoothing plus a z-loss.

CCE's default implementation is a set of Triton kernels for CUDA; on a CPU its "torch_compile" implementation runs,
here with torch.compiler.set_stance("force_eager"): CCE's own code (the valid-row filter, the shift, the
reduction="none" scatter, the soft-cap, F.cross_entropy over the float32 logits) without Inductor, which would
spend 10-15 s compiling each variant on a CPU. CCE 25.1.1 has no bias argument: a bias is compared through CCE on
the augmented inputs [e, 1] and [c, bias], whose logits are the same.
"""
import inspect

import pytest
import torch
import torch.nn.functional as F

import kc_kernels
from kc_kernels.compat import LinearCrossEntropy, linear_cross_entropy

try:
    import cut_cross_entropy as cce
except ImportError:  # the tests against CCE skip; those against F.cross_entropy still run
    cce = None
needs_cce = pytest.mark.skipif(
    cce is None, reason="cut-cross-entropy is not importable (pip install --no-deps -r requirements-peers.txt)")


# kc's cpu backend keeps its row statistics in float32 for every input dtype (docs/ops.md), so float64 results agree
# with the float64 definition to about 1e-7 relative, not to float64 accuracy
FP64_RTOL = 1e-6


def _close(got, want, rtol, what):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = float((got - want).abs().max()) if want.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    assert err <= rtol * scale + 1e-12, f"{what}: max error {err:.3g} against max {scale:.3g}"


def _problem(lead=(4, 12), D=32, V=1000, bias=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(*lead, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    c = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, lead, generator=g)
    flat = t.view(-1)
    flat[3::7] = -100  # ignored targets, some at a sequence's first and last positions
    if flat.numel() > 1:
        flat[-1] = -100
    return e, c, b, t


def _cce(e, c, t, bias=None, **kw):
    """CCE's linear_cross_entropy, its torch_compile implementation run eagerly; a bias through [e, 1] @ [c, b].T."""
    if bias is not None:
        e = torch.cat([e, torch.ones_like(e[..., :1])], dim=-1)
        c = torch.cat([c, bias[:, None]], dim=-1)
    with torch.compiler.set_stance("force_eager"):
        return cce.linear_cross_entropy(e, c, t, impl="torch_compile", **kw)


def _grads(out, wrt):
    return torch.autograd.grad(out.sum() if out.dim() else out, wrt)


@needs_cce
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_cce(softcap, shift, reduction):
    e, c, _, t = _problem()
    kw = dict(softcap=softcap, shift=shift, reduction=reduction)
    want = _cce(e, c, t, **kw)
    got = linear_cross_entropy(e, c, t, **kw)
    _close(got, want, 1e-5, "loss")
    for name, a, b in zip(("de", "dc"), _grads(got, (e, c)), _grads(want, (e, c))):
        _close(a, b, 1e-5, name)


@needs_cce
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bias_matches_cce(shift, reduction):
    e, c, b, t = _problem(bias=True, V=4099)
    want = _cce(e, c, t, bias=b, shift=shift, reduction=reduction, softcap=30.0)
    got = linear_cross_entropy(e, c, t, b, shift=shift, reduction=reduction, softcap=30.0)
    _close(got, want, 1e-5, "loss")
    for name, a, w in zip(("de", "dc", "dbias"), _grads(got, (e, c, b)), _grads(want, (e, c, b))):
        _close(a, w, 1e-5, name)


@needs_cce
@pytest.mark.parametrize("lead", [(1, 9), (1, 1, 7), (23,)])
def test_shapes_and_single_rows(lead):
    """B = 1, more than one leading dimension, and flat [N, D] rows (shifted along N)."""
    e, c, _, t = _problem(lead=lead, V=1000)
    for shift in (False, True):
        for reduction in ("mean", "none"):
            want = _cce(e, c, t, shift=shift, reduction=reduction)
            got = linear_cross_entropy(e, c, t, shift=shift, reduction=reduction)
            _close(got, want, 1e-5, f"loss shift={shift} {reduction}")
            _close(_grads(got, (e,))[0], _grads(want, (e,))[0], 1e-5, "de")


@needs_cce
def test_filter_eps_and_impl_are_accepted():
    e, c, _, t = _problem()
    base = linear_cross_entropy(e, c, t)
    for kw in (dict(filter_eps=None), dict(filter_eps="high"), dict(impl="cce"), dict(impl="torch_compile"),
               dict(impl=cce.LinearCrossEntropyImpl.CCE), dict(filter_e_grad=False, accum_c_fp32=True)):
        torch.testing.assert_close(linear_cross_entropy(e, c, t, **kw), base)


@needs_cce
def test_module_matches_cce():
    e, c, _, t = _problem()
    theirs = cce.LinearCrossEntropy(softcap=30.0, shift=True, reduction="sum", impl="torch_compile")
    with torch.compiler.set_stance("force_eager"):
        want = theirs(e, c, t)
    got = LinearCrossEntropy(softcap=30.0, shift=True, reduction="sum", impl="torch_compile")(e, c, t)
    _close(got, want, 1e-5, "loss")


@needs_cce
def test_signature_follows_cce():
    """CCE 25.1.1's parameters, in its order, with bias inserted fourth as its later releases have it."""
    theirs = [p for p in inspect.signature(cce.linear_cross_entropy).parameters if p not in ("filter_eps", "impl")]
    ours = list(inspect.signature(linear_cross_entropy).parameters)
    assert ours[:3] == theirs[:3] and ours[3] == "bias" and ours[4:4 + len(theirs) - 3] == theirs[3:]
    assert {"filter_eps", "impl"} <= set(ours)
    e, c, _, t = _problem()
    with pytest.raises(TypeError, match="ignore_index by name"):
        linear_cross_entropy(e, c, t, -100)


def _reference(e, c, t, bias, k, ignore_index=-100, softcap=None):
    """Per-position losses and log-sum-exps of e[..., j] against t[..., j + k] in float64 (the definition)."""
    logits = e.double() @ c.double().T + (bias.double() if bias is not None else 0.0)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    T = t.shape[-1]
    logits, t = logits[..., :T - k, :], t[..., k:]
    valid = t != ignore_index
    nll = F.cross_entropy(logits.flatten(0, -2), t.flatten(), ignore_index=ignore_index, reduction="none")
    lse = torch.logsumexp(logits, dim=-1)
    return nll.view(t.shape), torch.where(valid, lse, torch.zeros_like(lse)), valid


@pytest.mark.parametrize("k", [0, 1, 3])
def test_integer_shift_and_return_lse(k):
    """shift=k (later CCE releases): e[..., j] against targets[..., j + k]; return_lse: 0 at ignored targets."""
    e, c, b, t = _problem(lead=(3, 10), bias=True, dtype=torch.float64)
    nll, lse, valid = _reference(e, c, t, b, k, softcap=20.0)
    loss, got_lse = linear_cross_entropy(e, c, t, b, shift=k, reduction="none", return_lse=True, softcap=20.0)
    _close(loss, nll, FP64_RTOL, "loss")
    _close(got_lse, lse, FP64_RTOL, "lse")
    mean = linear_cross_entropy(e, c, t, b, shift=k, softcap=20.0)
    _close(mean, nll.sum() / valid.sum(), FP64_RTOL, "mean")
    want = torch.autograd.grad(nll.sum() / valid.sum(), (e, c, b))
    for name, a, w in zip(("de", "dc", "dbias"), torch.autograd.grad(mean, (e, c, b)), want):
        _close(a, w, FP64_RTOL, name)


@needs_cce
def test_no_counted_target_gives_zero():
    """A documented difference: CCE's mean over no counted target is 0/0 = NaN; kc's is 0, with zero gradients."""
    e, c, _, t = _problem(lead=(2, 5))
    t[:] = -100
    assert torch.isnan(_cce(e, c, t)).item()
    loss = linear_cross_entropy(e, c, t, shift=True)
    assert loss.item() == 0.0
    (de,) = torch.autograd.grad(loss, (e,))
    assert not de.any()


@pytest.mark.parametrize("smoothing,z", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kc_linear_cross_entropy_matches_torch(smoothing, z, reduction):
    """kc_kernels.linear_cross_entropy = F.cross_entropy(label_smoothing) + z * lse^2 over the counted rows."""
    e, c, b, t = _problem(lead=(40,), V=1000, bias=True, dtype=torch.float64)
    x, labels = e, t
    logits = x @ c.T + b
    valid = labels != -100
    ce = F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=smoothing, reduction="none")
    lse = torch.logsumexp(logits, dim=-1)
    rows = ce + z * torch.where(valid, lse * lse, torch.zeros_like(lse))
    want = {"mean": rows.sum() / valid.sum(), "sum": rows.sum(), "none": rows}[reduction]
    got, got_lse = kc_kernels.linear_cross_entropy(x, c, b, labels, label_smoothing=smoothing, z_loss=z,
                                                   reduction=reduction, return_lse=True)
    _close(got, want, FP64_RTOL, "loss")
    _close(got_lse, lse, FP64_RTOL, "lse")
    for name, a, w in zip(("dx", "dW", "dbias"), _grads(got, (x, c, b)), _grads(want, (x, c, b))):
        _close(a, w, FP64_RTOL, name)


def test_kc_linear_cross_entropy_fp32_single_row():
    e, c, b, t = _problem(lead=(1,), V=4099, bias=True)
    t[0] = 7
    want = F.cross_entropy((e @ c.T + b).double(), t, label_smoothing=0.1)
    got = kc_kernels.linear_cross_entropy(e, c, b, t, label_smoothing=0.1)
    _close(got, want, 1e-5, "loss")
    for name, a, w in zip(("dx", "dW", "dbias"), _grads(got, (e, c, b)), _grads(want, (e, c, b))):
        _close(a, w, 1e-5, name)
