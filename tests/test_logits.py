"""kc_kernels.soft_target_logits against the float64 reference's own y, over layouts, scales and row blocks."""
from __future__ import annotations

import pytest
import torch

import kc_kernels
from kc_kernels import reference
from tests.helpers import assert_close, make_problem


def reference_logits(x, weight, bias=None, segments=None, scale=None):
    """The reference's y, read from the reference itself: with every class a target of value v, sigmoid mode,
    T = 1 and a sum, d loss / d v[b, j] = -y[b, j] exactly."""
    x, weight = x.detach(), weight.detach()
    B, V = x.shape[0], weight.shape[0]
    value = torch.zeros(B, V, dtype=x.dtype, requires_grad=True)
    loss = reference.linear_soft_target_loss(x, weight, None if bias is None else bias.detach(),
                                             target_index=torch.arange(V).expand(B, V), target_value=value,
                                             segments=segments, scale=None if scale is None else scale.detach(),
                                             reduction="sum")
    return -torch.autograd.grad(loss, value)[0]


@pytest.mark.parametrize("G,grouped,scale_kind,bias,B", [
    (None, False, None, True, 5), (4, False, "segment", True, 7), (3, True, "segment", False, 1),
    (5, True, "class", True, 6), (None, False, "class", True, 3), (4, False, None, False, 2)])
def test_logits_are_the_reference_ones_in_float64(G, grouped, scale_kind, bias, B):
    p = make_problem(B, 5, 23, G=G, grouped=grouped, dtype=torch.float64, gen=torch.Generator().manual_seed(B),
                     scale_kind=scale_kind, bias=bias)
    want = reference_logits(p["x"], p["weight"], p["bias"], p.get("segments"), p.get("scale"))
    got = kc_kernels.soft_target_logits(p["x"], p["weight"], p["bias"], p.get("segments"), p.get("scale"))
    assert got.dtype == torch.float64
    assert torch.equal(got, want)  # the same operations in the same order: the same bits
    blocked = kc_kernels.soft_target_logits(p["x"], p["weight"], p["bias"], p.get("segments"), p.get("scale"), block=2)
    assert_close(blocked, want, torch.float64, "row blocks of 2")


def test_given_norms_replace_the_computed_ones_and_a_slice_of_a_segment_scores_alone():
    p = make_problem(6, 4, 20, G=2, dtype=torch.float64, gen=torch.Generator().manual_seed(1), scale_kind="segment")
    full = kc_kernels.soft_target_logits(p["x"], p["weight"], p["bias"], p["segments"], p["scale"])
    o = p["segments"].tolist()
    u = p["x"] @ p["weight"].t()
    norms = torch.stack([u[:, o[g]:o[g + 1]].norm(dim=1) for g in range(2)], dim=1)
    # classes [o1 + 2, o1 + 5) of segment 1 alone, with that segment's norm and scale
    c0, c1 = o[1] + 2, o[1] + 5
    part = kc_kernels.soft_target_logits(p["x"], p["weight"][c0:c1], p["bias"][c0:c1], scale=p["scale"][1:],
                                         norms=norms[:, 1:], block=4)
    assert_close(part, full[:, c0:c1], torch.float64, "a slice of segment 1")


def test_fp32_and_half_inputs_give_fp32_logits():
    p = make_problem(3, 4, 10, G=2, dtype=torch.float32, gen=torch.Generator().manual_seed(2), scale_kind="class")
    y = kc_kernels.soft_target_logits(p["x"], p["weight"], p["bias"], p["segments"], p["scale"])
    assert y.dtype == torch.float32
    y16 = kc_kernels.soft_target_logits(*(p[k].half() for k in ("x", "weight", "bias")), p["segments"],
                                        p["scale"].half())
    assert y16.dtype == torch.float32 and torch.allclose(y16, y, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(segments=[0, 3, 9]), "segments"), (dict(scale=torch.ones(4)), "scale"), (dict(block=0), "block"),
    (dict(norms=torch.ones(2, 1)), "norms"), (dict(scale=torch.ones(1), norms=torch.ones(3, 1)), "norms"),
    (dict(bias=torch.ones(9)), "bias")])
def test_bad_arguments_name_themselves(kwargs, arg):
    with pytest.raises(ValueError, match=f"^{arg}:"):
        kc_kernels.soft_target_logits(torch.ones(2, 3), torch.ones(10, 3), **kwargs)
