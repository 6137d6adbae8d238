import math

import numpy as np
import pytest
import torch

from kc import config, models, taxonomy
from kc_kernels import reference

SIZES = dict(sb=12, s1=10, s2=6, s1s=9, s1i=5, s2_fc=7, shared=2)


@pytest.mark.parametrize("kind", ["fc_fc", "fc_sc", "sc_sc", "fc_sc_shared"])
def test_head_parameter_count_matches_design_formula(kind):
    N, M = 23, 3
    head = models.Head(kind, SIZES["sb"], N, M, **{k: v for k, v in SIZES.items() if k != "sb"})
    assert models.count_parameters(head, weights_only=True) == models.head_weight_count(kind, N=N, M=M, **SIZES)
    h = head(torch.randn(4, SIZES["sb"]))
    assert h.shape == ((4, 7) if kind == "fc_fc" else (4, M, 6))


def test_design_formulas_by_hand():
    sb, s1, s2, N, M, s1s, s1i = 4, 5, 3, 20, 2, 6, 2
    assert models.head_weight_count("fc_fc", sb=sb, N=N, M=M, s1=s1, s2_fc=s2) == sb * s1 + s1 * s2 + s2 * N
    assert models.head_weight_count("fc_sc", sb=sb, N=N, M=M, s1s=s1s, s2=s2) == sb * s1s + s1s * s2 * M + s2 * N
    assert models.head_weight_count("sc_sc", sb=sb, N=N, M=M, s1i=s1i, s2=s2) == sb * s1i * M + s1i * s2 * M + s2 * N


def test_shared_head_blocks_share_their_first_units():
    head = models.Head("fc_sc_shared", 12, 23, 3, s1s=9, s2=6, shared=2)
    h = head(torch.randn(5, 12))
    assert torch.equal(h[:, 0, :2], h[:, 2, :2])


def _student(scale, head="fc_sc"):
    tax = taxonomy.generate(3, 24, seed=0)
    cfg = config.load("tiny")
    return models.build_student(cfg, (16,), tax, head, scale, backend="reference"), tax


@pytest.mark.parametrize("scale", ["none", "vertical", "class"])
def test_scale_kinds_init_at_sqrt_vertical_size(scale):
    s, tax = _student(scale)
    sizes = np.diff(tax.segments)
    if scale == "none":
        assert s.scale is None
    elif scale == "vertical":
        assert torch.allclose(s.scale, torch.tensor(np.sqrt(sizes), dtype=torch.float32))
    else:
        assert s.scale.shape == (24,)
        assert torch.allclose(s.scale, torch.tensor(np.repeat(np.sqrt(sizes), sizes), dtype=torch.float32))


@pytest.mark.parametrize("scale", ["none", "vertical", "class"])
@pytest.mark.parametrize("head", ["fc_fc", "fc_sc"])
def test_student_loss_is_the_reference_loss_of_its_scores(scale, head):
    torch.manual_seed(0)
    s, tax = _student(scale, head)
    x = torch.randn(5, 16)
    idx = torch.tensor([[0, 3, -1], [10, 12, 1], [20, -1, -1], [5, 5, 6], [23, 22, 21]])
    val = torch.rand(5, 3)
    loss = s.loss(x, idx, val)
    y = s.scores(x)  # scaled logits
    want = reference.soft_target_loss(y, target_index=idx, target_value=val)
    assert torch.allclose(loss, want, rtol=1e-4, atol=1e-4)
    loss.backward()
    if scale != "none":
        assert s.log_scale.grad is not None and torch.isfinite(s.log_scale.grad).all()


def test_specialist_and_cnn_backbone():
    tax = taxonomy.generate(2, 10, seed=0)
    cfg = config.load("tiny", overrides={"data": {"kind": "images", "path": "x"}, "taxonomy": {"file": "t.csv"},
                                         "student": {"backbone": "cnn"}})
    sp = models.build_specialist(cfg, (3, 8, 8), tax, 1)
    assert sp(torch.rand(2, 3, 8, 8)).shape == (2, len(tax.classes_of(1)))
    st = models.build_student(cfg, (3, 8, 8), tax, "sc_sc", "vertical")
    assert st.scores(torch.rand(2, 3, 8, 8)).shape == (2, 10)
    assert math.isclose(sp.out.bias[0].item(), -math.log(len(tax.classes_of(1))), rel_tol=1e-6)
