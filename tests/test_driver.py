"""The chunked driver's promises that are not about one backend's numbers: determinism, the bias outside the
self-paced normalisation, value checks on request, invalid indices never touched, cached layouts."""
import pytest
import torch

import kc_kernels
from kc_kernels import layout
from kc_kernels.ops import checks
from tests.helpers import assert_close, grads, make_problem

DIFF = ("x", "weight", "bias", "scale")


def _loss(p, backend="cpu", **kw):
    a = dict(p)
    return kc_kernels.linear_soft_target_loss(a.pop("x"), a.pop("weight"), a.pop("bias"), backend=backend, **a, **kw)


def _with_grad(p):
    return {k: (v.detach().clone().requires_grad_() if k in DIFF and v is not None else v) for k, v in p.items()}


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("scale_kind", [None, "segment", "class"])
def test_cpu_loss_and_gradients_are_bitwise_identical_across_calls(mode, scale_kind):
    p = make_problem(33, 16, 700, G=4, K=7, dtype=torch.float32, scale_kind=scale_kind,
                     gen=torch.Generator().manual_seed(7))
    outs = []
    for _ in range(2):
        q = _with_grad(p)
        loss = _loss(q, mode=mode, memory_budget=4 * 33 * 256)  # several chunks, one segment in row blocks
        outs.append([loss] + grads(loss, [q.get(k) for k in DIFF]))
    for a, b in zip(*outs):
        if a is not None:
            assert torch.equal(a, b)


def test_the_bias_is_added_after_the_scale():
    """With a per-segment scale, y = gamma u / ||u|| + b: shifting the bias of one class moves that class's logit
    by exactly the shift and leaves the others (the norm) untouched."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    gamma = torch.tensor([2.0], dtype=torch.float64)
    u = x @ w.t()
    y = gamma * u / torch.sqrt((u * u).sum(1, keepdim=True) + 1e-12) + b
    z = torch.rand(4, 6, generator=g, dtype=torch.float64)
    want = (torch.nn.functional.softplus(y) - z * y).sum(1)
    for backend in ("reference", "cpu"):
        got = kc_kernels.linear_soft_target_loss(x, w, b, teacher_logits=torch.logit(z), scale=gamma,
                                                 reduction="none", backend=backend)
        assert_close(got, want, torch.float32 if backend == "cpu" else torch.float64, backend)


def test_value_checks_follow_the_environment(monkeypatch):
    p = make_problem(3, 4, 10, K=2, dtype=torch.float32)
    p["target_index"] = torch.tensor([[0, 10], [1, -1], [2, 3]])  # 10 is out of range
    monkeypatch.delenv("KC_CHECK_VALUES", raising=False)
    assert checks.values_enabled(torch.device("cpu")) and not checks.values_enabled(torch.device("cuda"))
    with pytest.raises(ValueError, match="target_index"):
        _loss(p)
    monkeypatch.setenv("KC_CHECK_VALUES", "0")
    assert not checks.values_enabled(torch.device("cpu"))
    clean = {**p, "target_index": torch.tensor([[0, -1], [1, -1], [2, 3]])}
    assert torch.equal(_loss(p), _loss(clean))  # unchecked: the index out of range counts as padding
    monkeypatch.setenv("KC_CHECK_VALUES", "1")
    assert checks.values_enabled(torch.device("cuda"))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_unchecked_invalid_indices_are_ignored(monkeypatch, backend):
    """With the value checks off, an index outside [-1, V) is never read or written: it counts as padding."""
    if not kc_kernels.backends()[backend]:
        pytest.skip(f"{backend} unavailable")
    monkeypatch.setenv("KC_CHECK_VALUES", "0")
    p = make_problem(4, 8, 50, K=3, G=2, dtype=torch.float32, gen=torch.Generator().manual_seed(1))
    bad = p["target_index"].clone()
    bad[0, 0], bad[1, 2], bad[2, 1] = 50, 10 ** 9, -7
    clean = bad.clone()
    clean[(clean < 0) | (clean >= 50)] = -1
    got = _loss({**p, "target_index": bad}, backend=backend, mode="softmax")
    want = _loss({**p, "target_index": clean}, backend="reference", mode="softmax")
    assert_close(got, want.float(), torch.float32, "loss")


def test_segment_layouts_are_cached():
    a = checks.segment_layout(torch.tensor([0, 5, 9]), 9, "cpu")
    b = checks.segment_layout([0, 5, 9], 9, "cpu")
    assert a[0] == b[0] == [0, 5, 9] and a[1] is b[1]
    assert layout.plan((0, 5, 9), 256, False) is layout.plan((0, 5, 9), 256, False)


def test_plan_tables_are_built_once_per_device():
    pl = layout.plan((0, 3, 10, 600), 256, False)
    c = pl.steps[0][0]
    assert pl.tables(c, torch.device("cpu"), torch.int32)[0] is pl.tables(c, torch.device("cpu"), torch.int32)[0]
    assert pl.seg_of_class(torch.device("cpu")).tolist()[:4] == [0, 0, 0, 1]
