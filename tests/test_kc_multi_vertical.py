"""Rows in several verticals (as OpenImages has): the generator makes them on request, each labelled vertical's
teacher supplies its top-K over its own classes into the row's slot for it, and the hard term covers every label."""
import numpy as np
import pytest
import torch

from kc import cache, config, data, synthetic, taxonomy, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi")
    cfg = config.load("tiny", overrides={"data": {"multi_vertical": 0.7, "max_verticals": 3},
                                         "taxonomy": {"num_verticals": 4, "num_classes": 40}})
    tax = taxonomy.generate(4, 40, seed=0)
    synthetic.write_synthetic(str(d / "data"), tax, cfg.data, seed=0)
    tr = data.FeatureShards(str(d / "data" / "train"), tax.num_classes)
    return d, cfg, tax, tr


class StubTeacher(torch.nn.Module):
    """A fixed random linear teacher over one vertical's classes."""

    def __init__(self, dim, classes, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(classes, dim, generator=g)

    def forward(self, x):
        return x @ self.w.t()


def test_generator_rows_span_verticals_with_every_objects_labels(setup):
    _, cfg, tax, tr = setup
    vl = tr.vertical_lists(tax)
    counts = np.diff(vl.indptr)
    assert counts.min() == 1 and counts.max() == 3 and 0.5 < (counts > 1).mean() < 0.9
    assert np.array_equal(vl.indices[vl.indptr[:-1]], tr.verticals(tax))  # first: the first label's vertical
    for r in np.flatnonzero(counts == 3)[:20]:
        labels = tr.labels.indices[tr.labels.indptr[r]:tr.labels.indptr[r + 1]].tolist()
        verts = vl.indices[vl.indptr[r]:vl.indptr[r + 1]].tolist()
        assert len(set(verts)) == 3 and verts[0] == tax.vertical_of[labels[0]]
        # each object: a leaf and its ancestors, in turn
        leaves = [c for c in labels if tax.is_leaf[c]]
        assert len(leaves) == 3 and sorted(labels) == sorted(c for leaf in leaves for c in tax.labels_of(leaf))
    rows, slots = tr.rows_of_vertical(tax, 2)
    for r, s in zip(rows[:50], slots[:50]):
        assert vl.indices[vl.indptr[r] + s] == 2


def test_single_vertical_data_is_unchanged_by_the_option(setup):
    _, cfg, tax, _ = setup
    off = config.load("tiny", overrides={"taxonomy": {"num_verticals": 4, "num_classes": 40}}).data
    a = synthetic.SyntheticGenerator(tax, off, 0).make(np.array(tax.leaves()), np.random.default_rng(1))
    b = synthetic.SyntheticGenerator(tax, off, 0).make(np.array(tax.leaves()), np.random.default_rng(1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert np.all(np.diff(a[1]) == [len(tax.labels_of(int(c))) for c in tax.leaves()])


def test_each_labelled_verticals_teacher_fills_its_slot_and_hard_labels_cover_every_label(setup, tmp_path):
    _, cfg, tax, tr = setup
    K = 3
    ts = [StubTeacher(tr.input_shape[0], len(tax.classes_of(v)), v) for v in range(tax.num_verticals)]
    expected = cache.expected_manifest(tax, tr, K, [f"stub-{v}" for v in range(tax.num_verticals)],
                                       data.fingerprint(tr))
    assert expected["slots"] == 3
    cache.build(str(tmp_path), ts, tax, tr, expected, batch_size=7)
    c = cache.TeacherCache(str(tmp_path), expected)
    assert c.width == 3 * K
    vl = tr.vertical_lists(tax)
    three = np.flatnonzero(np.diff(vl.indptr) == 3)[:10]
    one = np.flatnonzero(np.diff(vl.indptr) == 1)[:3]
    assert len(three) >= 5
    idx = np.concatenate([three, one])
    ti, tv = c.batch(idx)
    for k, r in enumerate(idx):
        verts = vl.indices[vl.indptr[r]:vl.indptr[r + 1]].tolist()
        for j in range(3):
            got_i, got_v = ti[k, j * K:(j + 1) * K], tv[k, j * K:(j + 1) * K]
            if j >= len(verts):  # a slot the row has no vertical for is padding
                assert (got_i == -1).all() and (got_v == 0).all()
                continue
            v = verts[j]
            with torch.no_grad():
                p = torch.sigmoid(ts[v](tr.inputs(np.array([r]))))[0]
            want_v, want_i = p.topk(min(K, len(p)))
            assert got_i[:len(want_i)].tolist() == (want_i + int(tax.segments[v])).tolist()
            assert np.allclose(got_v[:len(want_v)].numpy(), want_v.numpy(), atol=2e-3)
    # the student's targets: every vertical's teacher top-K at (1 - w), every hard label at w
    w = cfg.student.hard_weight
    hard = tr.labels.padded(three)
    t_idx, t_val = train.make_targets("distilled", hard, c, three, w)
    for k, r in enumerate(three):
        labels = tr.labels.indices[tr.labels.indptr[r]:tr.labels.indptr[r + 1]]
        z = torch.zeros(tax.num_classes)
        keep = t_idx[k] >= 0
        z.index_add_(0, t_idx[k][keep], t_val[k][keep])
        teacher = torch.zeros(tax.num_classes)
        teacher.index_add_(0, ti[k][ti[k] >= 0], tv[k][ti[k] >= 0])
        want = (1 - w) * teacher
        want[torch.from_numpy(labels.astype(np.int64))] += w
        assert torch.allclose(z, want)
        for v in vl.indices[vl.indptr[r]:vl.indptr[r + 1]]:
            assert (teacher[tax.classes_of(int(v)).start:tax.classes_of(int(v)).stop] > 0).any()
    g_idx, g_val = train.make_targets("generalist", hard, None, three, w)
    assert all(set(tr.labels.indices[tr.labels.indptr[r]:tr.labels.indptr[r + 1]].tolist())
               == set(g_idx[k][g_idx[k] >= 0].tolist()) for k, r in enumerate(three))


def test_specialists_train_on_every_row_of_their_vertical(setup, monkeypatch):
    _, cfg, tax, tr = setup
    from kc import teachers

    seen = []
    real = tr.inputs

    def spy(idx):
        seen.append(np.asarray(idx).copy())
        return real(idx)

    monkeypatch.setattr(tr, "inputs", spy)
    one = config.load("tiny", overrides={"specialists": {"epochs": 1, "background_fraction": 0.0},
                                         "taxonomy": {"num_verticals": 4, "num_classes": 40},
                                         "data": {"multi_vertical": 0.7}})
    teachers.train_specialist(one, tax, tr, 1, seed=0)
    rows = np.unique(np.concatenate(seen))
    assert np.array_equal(rows, tr.rows_of_vertical(tax, 1)[0])
    assert (tr.verticals(tax)[rows] != 1).any()  # rows whose first label lies in another vertical


def test_config_refuses_bayes_methods_on_rows_spanning_verticals():
    with pytest.raises(config.ConfigError, match="bayes"):
        config.load("tiny", overrides={"data": {"multi_vertical": 0.5},
                                       "student": {"methods": ["bayes_distilled"]}})
    with pytest.raises(config.ConfigError, match="data.max_verticals"):
        config.load("tiny", overrides={"data": {"multi_vertical": 0.5, "max_verticals": 9}})


def test_a_run_on_rows_spanning_verticals(tmp_path):
    import json
    import os

    from kc import cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  multi_vertical: 0.5\nstudent:\n  methods: [distilled]\n  heads: [fc_sc]\n")
    out = str(tmp_path / "o")
    assert cli.main(["run", "--preset", "tiny", "--config", str(cfg), "--out", out, "--no-progress"]) == 0
    with open(os.path.join(out, "report", "results.json")) as f:
        res = json.load(f)
    assert list(res["models"]) == ["distilled-fc_sc", "specialists"]  # the posterior models one object a row
    with open(os.path.join(out, "cache", "manifest.json")) as f:
        assert json.load(f)["slots"] == 3
