import copy
import math

import numpy as np
import pytest
import torch

import kc_kernels
from kc import config, models, taxonomy
from kc_kernels import reference
from tests.test_logits import reference_logits

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
    # in float64 the student's scores are the reference's logits, bit for bit
    s64, x64 = copy.deepcopy(s).double(), x.double()
    assert torch.equal(s64.scores(x64), reference_logits(s64(x64), s64.head.weight, s64.head.bias, s64.segments,
                                                         s64.scale))
    loss.backward()
    if scale != "none":
        assert s.log_scale.grad is not None and torch.isfinite(s.log_scale.grad).all()


@pytest.mark.parametrize("head", ["fc_fc", "fc_sc", "sc_sc"])
def test_student_forward_is_the_hidden_units_the_fused_loss_reads(head):
    torch.manual_seed(0)
    s, tax = _student("vertical", head)
    x = torch.randn(5, 16)
    h = s(x)
    assert h.shape == ((5, s.head.width) if head == "fc_fc" else (5, tax.num_verticals, s.head.width))
    assert torch.equal(h, s.hidden(x))
    idx = torch.tensor([[0, 3, -1], [10, 12, 1], [20, -1, -1], [5, 5, 6], [23, 22, 21]])
    val = torch.rand(5, 3)
    want = kc_kernels.linear_soft_target_loss(h, s.head.weight, s.head.bias, target_index=idx, target_value=val,
                                              mode="sigmoid", segments=s.segments, scale=s.scale,
                                              backend="reference")
    assert torch.allclose(s.loss(x, idx, val), want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(s.loss(x, idx, val), reference.soft_target_loss(s.scores(x), target_index=idx,
                                                                          target_value=val), rtol=1e-4, atol=1e-4)


def test_specialist_and_cnn_backbone():
    tax = taxonomy.generate(2, 10, seed=0)
    cfg = config.load("tiny", overrides={"data": {"kind": "images", "path": "x"}, "taxonomy": {"file": "t.csv"},
                                         "student": {"backbone": "cnn"}})
    sp = models.build_specialist(cfg, (3, 8, 8), tax, 1)
    assert sp(torch.rand(2, 3, 8, 8)).shape == (2, len(tax.classes_of(1)))
    st = models.build_student(cfg, (3, 8, 8), tax, "sc_sc", "vertical")
    assert st.scores(torch.rand(2, 3, 8, 8)).shape == (2, 10)
    assert math.isclose(sp.out.bias[0].item(), -math.log(len(tax.classes_of(1))), rel_tol=1e-6)


def test_methods_of_a_head_start_from_the_same_weights(tmp_path):
    from kc import train

    tax = taxonomy.generate(3, 24, seed=0)
    cfg = config.load("tiny")
    states = []
    for run in ("generalist-fc_sc", "self_paced-fc_sc"):
        torch.manual_seed(train.head_seed(5, "fc_sc"))
        states.append(train.make_student(cfg, tax, (16,), run).state_dict())
    a, b = states
    assert set(b) - set(a) == {"log_scale"}
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_size_matched_fc_fc_has_fc_sc_weights():
    N, M = 400, 8
    kw = dict(sb=128, s1=128, s2=32, s1s=128)
    w = models.head_weight_count("fc_fc_matched", N=N, M=M, **kw)
    target = models.head_weight_count("fc_sc", N=N, M=M, **kw)
    assert abs(w - target) <= 128 + N  # one unit of width
    head = models.Head("fc_fc_matched", 128, N, M, s1=128, s2=32, s1s=128)
    assert models.count_parameters(head, weights_only=True) == w and not head.grouped


def test_scale_init_rules():
    sizes = torch.tensor([10.0, 1000.0])
    assert torch.allclose(models.initial_log_scale(sizes, "sqrt").exp(), sizes.double().sqrt())
    g = models.initial_log_scale(sizes, "sqrt_log", k=2.0).exp()
    assert torch.allclose(g, sizes.double().sqrt() * torch.log(sizes.double() / 2))
    assert torch.allclose(models.initial_log_scale(sizes, "fixed", value=7.0).exp(), torch.full((2,), 7.0).double())


def test_bias_starts_at_the_class_prior_and_stays_outside_the_scale():
    s, tax = _student("vertical")
    counts = np.arange(24) * 3
    s.init_bias(counts, 100)
    p = torch.sigmoid(s.head.bias.detach()).numpy()
    assert np.allclose(p, (counts + 0.5) / 101, rtol=1e-5)
    # the scale only acts on x.w: the scores less the bias have norm gamma_v in every vertical
    y = s.scores(torch.randn(4, 16)) - s.head.bias
    for v in range(3):
        c0, c1 = tax.segments[v], tax.segments[v + 1]
        assert torch.allclose(y[:, c0:c1].norm(dim=1), s.scale[v].expand(4), rtol=1e-4)


def test_health_sees_a_collapsed_student():
    from kc import train

    s, _ = _student("vertical")
    x = torch.randn(32, 16)
    h0 = train.health(s, x)
    assert 0 <= h0["dead"] < 0.5 and h0["spread"] > 0.05
    cfg = config.load("tiny")
    train.check_health(cfg, "r", h0, h0, "start")  # a fresh network is not collapsed
    with torch.no_grad():  # every row gets the same hidden units: the output ignores the input
        s.head.layers[1].weight.zero_()
    h = train.health(s, x)
    assert h["spread"] < 1e-4
    with pytest.raises(train.TrainingCollapsed, match="no longer depends on the input"):
        train.check_health(cfg, "r", h, h0, "step 3")


def test_training_stops_with_a_clear_message_when_collapsed(tmp_path):
    from kc import data, synthetic, train

    tax = taxonomy.generate(3, 30, seed=0)
    # a spread limit above 1 can never be met: the first check must stop training
    cfg = config.load("tiny", overrides={"student": {"collapse_spread": 2.0, "epochs": 1}})
    synthetic.write_synthetic(str(tmp_path / "d"), tax, cfg.data, seed=0)
    tr = data.FeatureShards(str(tmp_path / "d" / "train"), tax.num_classes)
    with pytest.raises(train.TrainingCollapsed, match="generalist-fc_sc collapsed at epoch 1"):
        train.train_student(cfg, tax, tr, "generalist-fc_sc", str(tmp_path / "s.pt"), seed=0)


@pytest.mark.parametrize("total", [1, 2, 3, 4, 5, 6, 10, 37])
def test_specialist_schedule_runs_any_number_of_steps(total):
    """torch's OneCycleLR divides by zero at 5 steps with a 20% warm-up: every length must schedule, peak at
    max_lr and never go negative or NaN."""
    from kc.teachers import one_cycle

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = one_cycle(opt, 0.1, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert all(0 < lr <= 0.1 + 1e-12 for lr in lrs) and max(lrs) > 0.05


def test_sc_blocks_of_a_shared_input_are_one_gemm_of_the_einsum():
    torch.manual_seed(0)
    layer = models.BlockLinear(5, 12, 7)
    x = torch.randn(9, 12, requires_grad=True)
    y = layer(x)
    want = torch.einsum("bi,moi->bmo", x, layer.weight) + layer.bias
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    wants = torch.autograd.grad(want, (x, layer.weight, layer.bias), g)
    for a, b in zip(grads, wants):
        torch.testing.assert_close(a, b)
