"""kc_kernels.compat.LigerFusedLinearJSDLoss against Liger-Kernel's own LigerFusedLinearJSDLoss (0.8.5): the loss,
the returned soft and hard parts, and the gradients to the student's input, weight and bias.

Liger-Kernel runs with compiled=False (the same math without torch.compile, which would spend seconds compiling on
a CPU). Its hard loss takes a float32 log-softmax even for float64 inputs, and it accumulates the loss in float32,
so both dtypes are compared at float32 accuracy.
"""
import pytest
import torch

from kc_kernels.compat import LigerFusedLinearJSDLoss

liger = pytest.importorskip("liger_kernel.chunked_loss",
                            reason="liger-kernel is not importable (pip install --no-deps -r requirements-peers.txt)")

RTOL = {torch.float32: 2e-5, torch.float64: 2e-6}


def _close(got, want, rtol, what):
    """max |got - want| <= rtol * max |want| (plus a tiny floor for all-zero references)."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = float((got - want).abs().max()) if want.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    assert err <= rtol * scale + 1e-12, f"{what}: max error {err:.3g} against max {scale:.3g}"


def _problem(B=32, H=48, Ht=64, V=1000, Vt=None, dtype=torch.float64, bias=True, ignore_every=5,
             ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    Vt = Vt or V

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    x = r(B, H).requires_grad_()
    w = r(V, H, s=0.3).requires_grad_()
    b = r(V, s=0.5).requires_grad_() if bias else None
    tx = r(B, Ht)
    tw = r(Vt, Ht, s=0.3)
    tb = r(Vt, s=0.5) if bias else None
    y = torch.randint(0, V, (B,), generator=g)
    if ignore_every:
        y[::ignore_every] = ignore_index
    return x, w, b, tx, tw, tb, y


def _compare(kw, prob, dtype, parts=False):
    x, w, b, tx, tw, tb, y = prob
    theirs = liger.LigerFusedLinearJSDLoss(compiled=False, return_soft_hard_loss=parts, **kw)
    ours = LigerFusedLinearJSDLoss(return_soft_hard_loss=parts, **kw)
    wrt = [x, w] + ([b] if b is not None else [])
    results = []
    for m in (theirs, ours):
        out = m(x, w, tx, tw, y, b, tb)
        outs = out if parts else (out,)
        assert isinstance(outs[0], torch.Tensor) and outs[0].dim() == 0
        grads = torch.autograd.grad(outs[0], wrt)
        results.append((outs, grads))
    (o_t, g_t), (o_o, g_o) = results
    rtol = RTOL[dtype]
    names = ("loss", "soft_loss", "hard_loss")
    for name, a, c in zip(names, o_o, o_t):
        _close(a, c, rtol, name)
    for name, a, c in zip(("dx", "dW", "dbias"), g_o, g_t):
        assert a.dtype == c.dtype, f"{name}: dtype {a.dtype} != {c.dtype}"
        _close(a, c, rtol, name)
    return o_o


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_liger_fp64(beta, temperature, bias):
    kw = dict(beta=beta, temperature=temperature, weight_hard_loss=0.3, weight_soft_loss=0.7)
    _compare(kw, _problem(bias=bias), torch.float64)


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
def test_matches_liger_fp32(beta):
    kw = dict(beta=beta, temperature=2.0, weight_hard_loss=0.5, weight_soft_loss=0.5)
    _compare(kw, _problem(dtype=torch.float32, V=4099, B=16), torch.float32)


@pytest.mark.parametrize("beta,temperature", [(0.5, 1.0), (0.0, 2.0), (1.0, 3.0)])
def test_soft_and_hard_parts(beta, temperature):
    kw = dict(beta=beta, temperature=temperature, weight_hard_loss=0.2, weight_soft_loss=0.8)
    loss, soft, hard = _compare(kw, _problem(), torch.float64, parts=True)
    assert not soft.requires_grad and not hard.requires_grad
    torch.testing.assert_close(loss.detach(), 0.2 * hard + 0.8 * soft)


@pytest.mark.parametrize("wh,ws", [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (2.0, 0.5)])
def test_weight_mixes(wh, ws):
    _compare(dict(beta=0.5, temperature=2.0, weight_hard_loss=wh, weight_soft_loss=ws), _problem(), torch.float64)


def test_parts_with_zero_weights():
    """Both parts are computed and returned even where their weights are 0, as Liger-Kernel does."""
    kw = dict(beta=0.5, temperature=1.0, weight_hard_loss=0.0, weight_soft_loss=0.0)
    _, soft, hard = _compare(kw, _problem(), torch.float64, parts=True)
    assert float(soft) > 0 and float(hard) > 0


def test_single_row_and_other_ignore_index():
    prob = _problem(B=1, V=1000, ignore_every=0, ignore_index=-1)
    _compare(dict(beta=0.5, temperature=2.0, ignore_index=-1), prob, torch.float64)
    x, w, b, tx, tw, tb, y = _problem(B=17, V=1000, ignore_every=3, ignore_index=-1)
    _compare(dict(beta=0.5, ignore_index=-1), (x, w, b, tx, tw, tb, y), torch.float64)


def test_every_row_ignored_gives_zero():
    """Liger-Kernel divides by max(1, tokens counted): with none counted the loss and its gradients are 0."""
    x, w, b, tx, tw, tb, y = _problem(B=8)
    y[:] = -100
    out = _compare(dict(beta=0.5, temperature=2.0), (x, w, b, tx, tw, tb, y), torch.float64)
    assert float(out[0].detach()) == 0.0


def test_padded_teacher_vocabulary():
    """A teacher with more classes than the student: the student's extra logits are 0 in the soft term."""
    prob = _problem(V=1000, Vt=1024)
    _compare(dict(beta=0.5, temperature=2.0), prob, torch.float64)
    _compare(dict(beta=0.0, temperature=1.0), prob, torch.float64, parts=True)


def test_sequence_shaped_input():
    """[batch, seq, H] inputs are taken as their rows, as flattening them for Liger-Kernel would."""
    x, w, b, tx, tw, tb, y = _problem(B=24)
    m = LigerFusedLinearJSDLoss(beta=0.5, temperature=2.0)
    flat = m(x, w, tx, tw, y, b, tb)
    seq = m(x.reshape(4, 6, -1), w, tx.reshape(4, 6, -1), tw, y.reshape(4, 6), b, tb)
    torch.testing.assert_close(seq, flat)


def test_teacher_gets_no_gradient():
    x, w, b, tx, tw, tb, y = _problem(B=8)
    tw = tw.clone().requires_grad_()
    loss = LigerFusedLinearJSDLoss()(x, w, tx, tw, y, b, tb)
    loss.backward()
    assert tw.grad is None and x.grad is not None


def test_constructor_matches_liger():
    """The same constructor arguments, in the same order, with the same defaults."""
    import inspect

    theirs = inspect.signature(liger.LigerFusedLinearJSDLoss.__init__).parameters
    ours = inspect.signature(LigerFusedLinearJSDLoss.__init__).parameters
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in theirs.values()]
    theirs_f = inspect.signature(liger.LigerFusedLinearJSDLoss.forward).parameters
    ours_f = inspect.signature(LigerFusedLinearJSDLoss.forward).parameters
    assert [(p.name, p.default) for p in ours_f.values()] == [(p.name, p.default) for p in theirs_f.values()]
    with pytest.raises(ValueError, match="temperature"):
        LigerFusedLinearJSDLoss(temperature=0)
