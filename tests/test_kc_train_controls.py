"""The controls that separate the method's effects: the self-paced scale on hard labels alone (scaled), the
normalised head at a fixed gamma (fixed_scale), a learned gamma per class (self_paced_class); and the learned
gammas per vertical kept with each student."""
import numpy as np
import pytest
import torch

from kc import config, data, models, synthetic, taxonomy, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("controls")
    cfg = config.load("tiny", overrides={"stopping": {"patience": 0}})
    tax = taxonomy.generate(3, 30, seed=0)
    synthetic.write_synthetic(str(d / "data"), tax, cfg.data, seed=0)
    return d, cfg, tax, data.FeatureShards(str(d / "data" / "train"), tax.num_classes)


def test_methods_are_known_and_route_as_documented():
    assert {"scaled", "fixed_scale", "self_paced_class"} <= set(config.METHODS)
    cfg = config.load("tiny", overrides={"student": {"methods": ["scaled", "fixed_scale", "self_paced_class"]}})
    assert [train.distils(m) for m in cfg.student.methods] == [False, True, True]
    assert [train.run_scale(cfg, m) for m in ("generalist", "scaled", "fixed_scale", "self_paced_class")] == \
        ["none", "vertical", "vertical", "class"]
    hard = np.array([[3, 1, -1]])
    a = train.make_targets("scaled", hard, None, np.array([0]), 0.3)
    b = train.make_targets("generalist", hard, None, np.array([0]), 0.3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # hard labels only, no teacher


def _train(setup, tmp_path, run, cache=None):
    d, cfg, tax, tr = setup
    return train.train_student(cfg, tax, tr, run, str(tmp_path / f"{run}.pt"), 0, cache=cache)


def test_scaled_learns_gamma_on_hard_labels_without_a_cache(setup, tmp_path):
    _, cfg, tax, _ = setup
    res = _train(setup, tmp_path, "scaled-fc_sc")
    m = res["model"]
    start = models.initial_log_scale(torch.tensor(tax.vertical_sizes()), cfg.student.scale_init).exp()
    assert m.log_scale.numel() == tax.num_verticals
    assert not torch.allclose(m.scale.detach(), start.float())  # learnt
    assert res["gamma"] == pytest.approx(m.scale.detach().tolist())


def test_fixed_scale_keeps_gamma_at_its_start(setup, tmp_path):
    d, cfg, tax, tr = setup
    from kc import cache as cache_mod

    class Zero(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def forward(self, x):
            return torch.zeros(x.shape[0], self.n)

    exp = cache_mod.expected_manifest(tax, tr, 2, ["z"] * tax.num_verticals, data.fingerprint(tr))
    cache_mod.build(str(tmp_path / "cache"), [Zero(len(tax.classes_of(v))) for v in range(tax.num_verticals)],
                    tax, tr, exp)
    c = cache_mod.TeacherCache(str(tmp_path / "cache"), exp)
    res = _train(setup, tmp_path, "fixed_scale-fc_sc", cache=c)
    start = models.initial_log_scale(torch.tensor(tax.vertical_sizes()), cfg.student.scale_init)
    assert torch.equal(res["model"].log_scale.detach(), start.float())
    assert not res["model"].log_scale.requires_grad
    cls = _train(setup, tmp_path, "self_paced_class-fc_sc", cache=c)
    assert cls["model"].log_scale.numel() == tax.num_classes and len(cls["gamma"]) == tax.num_verticals
    loaded, state = train.load_student(cfg, tax, tr.input_shape, "fixed_scale-fc_sc",
                                       str(tmp_path / "fixed_scale-fc_sc.pt"))
    assert torch.equal(loaded.log_scale.detach(), start.float()) and state["gamma"] == res["gamma"]
