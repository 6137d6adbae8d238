"""The reference ops against brute-force loops, gradcheck and torch's own losses."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from kc_kernels import reference
from tests.helpers import assert_close, brute_force_soft_target, grads, make_problem

CASES = list(itertools.product(("sigmoid", "softmax"), ("sparse", "dense"), ("flat", "segments", "grouped"),
                               (None, "segment", "class"), ("none", "sum", "mean")))


@pytest.mark.parametrize("mode,target_form,layout,scale_kind,reduction", CASES)
def test_reference_matches_brute_force(mode, target_form, layout, scale_kind, reduction):
    i = CASES.index((mode, target_form, layout, scale_kind, reduction))
    gen = torch.Generator().manual_seed(100 + i)
    temperature = (1.0, 2.5, 0.7)[i % 3]
    B = (3, 1, 2)[i % 3]
    p = make_problem(B, 4, 7, G=None if layout == "flat" else 3, grouped=layout == "grouped", gen=gen,
                     scale_kind=scale_kind, target_form=target_form, sample_weight=i % 2 == 0, K=4)
    for k in ("x", "weight", "bias", "scale"):
        if p.get(k) is not None:
            p[k].requires_grad_(True)
    kw = {k: v for k, v in p.items() if k not in ("x", "weight", "bias")}
    ref = reference.linear_soft_target_loss(p["x"], p["weight"], p["bias"], mode=mode, temperature=temperature,
                                            reduction=reduction, **kw)
    bf = brute_force_soft_target(p["x"], p["weight"], p["bias"], mode=mode, temperature=temperature,
                                 reduction=reduction, **kw)
    assert_close(ref, bf, what="loss")
    params = [p["x"], p["weight"], p["bias"], p.get("scale")]
    for name, a, b in zip(("dx", "dweight", "dbias", "dscale"), grads(ref, params), grads(bf, params)):
        if a is not None:
            assert_close(a, b, what=name)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("scale_kind", [None, "segment", "class"])
def test_reference_gradcheck(mode, scale_kind, gen):
    p = make_problem(3, 5, 9, G=3, gen=gen, scale_kind=scale_kind, sample_weight=True)
    kw = {k: v for k, v in p.items() if k not in ("x", "weight", "bias", "scale")}
    inputs = [p["x"].requires_grad_(), p["weight"].requires_grad_(), p["bias"].requires_grad_()]
    if scale_kind:
        inputs.append(p["scale"].requires_grad_())

    def f(x, w, b, s=None):
        return reference.linear_soft_target_loss(x, w, b, scale=s, mode=mode, temperature=1.7, reduction="none", **kw)

    assert torch.autograd.gradcheck(f, inputs)


def test_sigmoid_dense_is_bce_with_logits_summed(gen):
    p = make_problem(5, 6, 11, gen=gen, target_form="dense")
    T = 2.0
    loss = reference.linear_soft_target_loss(p["x"], p["weight"], p["bias"], teacher_logits=p["teacher_logits"],
                                             temperature=T, reduction="sum")
    u = p["x"] @ p["weight"].t() + p["bias"]
    expected = F.binary_cross_entropy_with_logits(u / T, torch.sigmoid(p["teacher_logits"] / T), reduction="sum")
    assert_close(loss, expected, what="loss")


def test_softmax_sparse_is_cross_entropy_with_probabilities(gen):
    B, V = 6, 13
    p = make_problem(B, 5, V, gen=gen)
    probs = torch.softmax(torch.randn(B, V, generator=gen, dtype=torch.float64), dim=1)
    idx = torch.arange(V).expand(B, V)
    T = 3.0
    loss = reference.linear_soft_target_loss(p["x"], p["weight"], p["bias"], target_index=idx, target_value=probs,
                                             mode="softmax", temperature=T)
    u = p["x"] @ p["weight"].t() + p["bias"]
    assert_close(loss, T * T * F.cross_entropy(u / T, probs), what="loss")
    labels = torch.randint(0, V, (B,), generator=gen)
    hard = reference.linear_soft_target_loss(p["x"], p["weight"], p["bias"], target_index=labels[:, None],
                                             target_value=torch.ones(B, 1, dtype=torch.float64), mode="softmax")
    assert_close(hard, F.cross_entropy(u, labels), what="hard-label loss")


def test_softmax_dense_is_kl_div_plus_teacher_entropy(gen):
    B, V, T = 4, 9, 1.5
    p = make_problem(B, 5, V, gen=gen, target_form="dense")
    loss = reference.linear_soft_target_loss(p["x"], p["weight"], p["bias"], teacher_logits=p["teacher_logits"],
                                             mode="softmax", temperature=T, reduction="sum")
    u = p["x"] @ p["weight"].t() + p["bias"]
    pt = torch.softmax(p["teacher_logits"] / T, dim=1)
    kl = F.kl_div(torch.log_softmax(u / T, dim=1), pt, reduction="sum")
    entropy = -(pt * torch.log(pt)).sum()
    assert_close(loss, T * T * (kl + entropy), what="loss")


def test_grouped_x_is_block_diagonal_linear(gen):
    p = make_problem(3, 4, 10, G=3, grouped=True, gen=gen)
    bounds = p["segments"].tolist()
    u = reference.linear_logits(p["x"], p["weight"], p["bias"], p["segments"])
    for g in range(3):
        sl = slice(bounds[g], bounds[g + 1])
        assert_close(u[:, sl], p["x"][:, g] @ p["weight"][sl].t() + p["bias"][sl], what=f"segment {g}")


def test_duplicate_targets_add_up(gen):
    idx = torch.tensor([[1, 1, -1], [4, 0, 4]])
    val = torch.tensor([[0.25, 0.5, 0.9], [0.1, 0.2, 0.3]], dtype=torch.float64)
    z = reference.dense_targets(5, batch=2, target_index=idx, target_value=val, dtype=torch.float64)
    expected = torch.zeros(2, 5, dtype=torch.float64)
    expected[0, 1] = 0.75
    expected[1, 4] = 0.4
    expected[1, 0] = 0.2
    assert torch.equal(z, expected)


def test_half_inputs_compute_in_fp32_and_return_grads_in_input_dtype(gen):
    p = make_problem(4, 8, 12, gen=gen, dtype=torch.float16)
    x = p["x"].requires_grad_()
    loss = reference.linear_soft_target_loss(x, p["weight"], p["bias"], target_index=p["target_index"],
                                             target_value=p["target_value"])
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.float16
