import numpy as np
import pytest

from kc import config, synthetic, taxonomy
from kc.data import DataError, FeatureShards, ImageFolder, Labels, ShardWriter


@pytest.fixture
def tax():
    return taxonomy.generate(3, 30, seed=0)


def small_cfg(**kw):
    return config.load("tiny", overrides={"data": kw}).data


def test_generator_is_deterministic_and_streams(tax):
    cfg = small_cfg()
    a = list(synthetic.SyntheticGenerator(tax, cfg, seed=5).stream("train", 16))
    b = list(synthetic.SyntheticGenerator(tax, cfg, seed=5).stream("train", 16))
    c = list(synthetic.SyntheticGenerator(tax, cfg, seed=6).stream("train", 16))
    assert len(a) > 1 and all(x[0].shape[0] <= 16 for x in a)
    for (fa, pa, ia), (fb, pb, ib) in zip(a, b):
        assert np.array_equal(fa, fb) and np.array_equal(pa, pb) and np.array_equal(ia, ib)
    assert not np.array_equal(a[0][0], c[0][0])
    n = sum(x[0].shape[0] for x in a)
    assert n == len(tax.leaves()) * cfg.train_per_class


def test_generator_labels_carry_ancestors_and_siblings_are_close(tax):
    cfg = small_cfg()
    gen = synthetic.SyntheticGenerator(tax, cfg, seed=0)
    feats, ptr, ind = next(gen.stream("test", 1000))
    for r in range(len(ptr) - 1):
        row = ind[ptr[r]:ptr[r + 1]].tolist()
        assert row == tax.labels_of(row[0])
    # siblings share the parent's code: closer to each other than to a class of another vertical
    leaves = tax.leaves()
    a = leaves[0]
    sib = [c for c in leaves if tax.parent[c] == tax.parent[a] and c != a][0]
    other = [c for c in leaves if tax.vertical_of[c] != tax.vertical_of[a]][0]
    def proto(c):
        return gen.center[tax.vertical_of[c]] + gen.code[c] @ gen.basis[tax.vertical_of[c]].T
    assert np.linalg.norm(proto(a) - proto(sib)) < np.linalg.norm(proto(a) - proto(other))


def test_label_noise_moves_labels_to_siblings(tax):
    cfg = small_cfg(label_noise=0.5)
    gen = synthetic.SyntheticGenerator(tax, cfg, seed=0)
    fine = np.repeat(tax.leaves(), 20)
    _, ptr, ind = gen.make(fine, np.random.default_rng(0), label_noise=0.5)
    got = ind[ptr[:-1]]
    changed = got != fine
    assert 0.2 < changed.mean() < 0.6
    assert np.all(tax.parent[got[changed]] == tax.parent[fine[changed]])


def test_feature_shards_round_trip(tmp_path, tax):
    w = ShardWriter(str(tmp_path))
    rng = np.random.default_rng(0)
    rows = []
    for s in range(3):
        n = 5 + s
        f = rng.standard_normal((n, 4)).astype(np.float32)
        lab = [tax.labels_of(int(c)) for c in rng.choice(tax.leaves(), n)]
        ptr = np.concatenate([[0], np.cumsum([len(x) for x in lab])])
        w.write(f, ptr, np.concatenate(lab))
        rows += list(zip(f, lab))
    w.close({})
    ds = FeatureShards(str(tmp_path), tax.num_classes)
    assert len(ds) == len(rows) and ds.input_shape == (4,)
    idx = np.array([17, 0, 6, 5, 11])
    x = ds.inputs(idx).numpy()
    for k, i in enumerate(idx):
        assert np.array_equal(x[k], rows[i][0])
    pad = ds.labels.padded(idx)
    for k, i in enumerate(idx):
        assert [c for c in pad[k] if c >= 0] == rows[i][1]
    colptr, colrows = ds.labels.columns(tax.num_classes)
    c = rows[3][1][0]
    assert 3 in colrows[colptr[c]:colptr[c + 1]]


def test_feature_shards_bad_data(tmp_path, tax):
    with pytest.raises(DataError, match="no feature shards"):
        FeatureShards(str(tmp_path), tax.num_classes)
    w = ShardWriter(str(tmp_path / "a"))
    w.write(np.zeros((2, 3), np.float32), np.array([0, 1, 2]), np.array([0, 999]))
    with pytest.raises(DataError, match="label ids"):
        FeatureShards(str(tmp_path / "a"), tax.num_classes)
    with pytest.raises(DataError, match="already holds shards"):  # refused, not deleted
        ShardWriter(str(tmp_path / "a"))
    assert (tmp_path / "a" / "shard-00000.features.npy").exists()
    w = ShardWriter(str(tmp_path / "b"))
    w.write(np.zeros((2, 3), np.float32), np.array([0, 1]), np.array([0]))
    with pytest.raises(DataError, match="rows"):
        FeatureShards(str(tmp_path / "b"), tax.num_classes)


def test_labels_rows():
    lab = Labels(np.array([0, 2, 3, 6]), np.array([5, 1, 7, 9, 8, 2], dtype=np.int32))
    ptr, ind = lab.rows(np.array([2, 0]))
    assert ptr.tolist() == [0, 3, 5] and ind.tolist() == [9, 8, 2, 5, 1]
    assert lab.fine().tolist() == [5, 7, 9]


def _write_images(root, tax, per_class=2, size=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in tax.leaves()[:4]:
        d = root / tax.names[c]
        d.mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{k}.png")


def test_image_folder(tmp_path, tax):
    _write_images(tmp_path, tax)
    ds = ImageFolder(str(tmp_path), tax, image_size=8)
    assert len(ds) == 8 and ds.input_shape == (3, 8, 8)
    x = ds.inputs(np.arange(3))
    assert x.shape == (3, 3, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1
    first = int(ds.labels.fine()[0])
    assert ds.labels.padded(np.array([0]))[0].tolist()[:len(tax.labels_of(first))] == tax.labels_of(first)


def test_image_folder_errors(tmp_path, tax):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(str(tmp_path / "nope"), tax)
    (tmp_path / "not-a-class").mkdir()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "not-a-class" / "a.png")
    with pytest.raises(DataError, match="not a class"):
        ImageFolder(str(tmp_path), tax)


def test_bayes_posterior_is_the_generators_density(tax):
    cfg = small_cfg(modes=2, mode_spread=0.5)
    gen = synthetic.SyntheticGenerator(tax, cfg, seed=3)
    fine = np.repeat(tax.leaves(), 3)
    x, _, _ = gen.make(fine, np.random.default_rng(1))
    v = 1
    leaves = [c for c in tax.leaves() if tax.vertical_of[c] == v]
    lj = gen.leaf_log_joint(x, v)
    # brute force: a mixture over poses of Gaussians with the full covariance
    S = cfg.isotropic_noise ** 2 * np.eye(cfg.feature_dim) + gen.noise[v] ** 2 * gen.basis[v] @ gen.basis[v].T
    Si, (_, logdet) = np.linalg.inv(S), np.linalg.slogdet(S)
    for j, c in enumerate(leaves[:3]):
        dens = []
        for m in range(cfg.modes):
            mu = gen.center[v] + (gen.code[c] + gen.mode_code[gen.root[c], m]) @ gen.basis[v].T
            r = x - mu
            dens.append(-0.5 * (np.einsum("ni,ij,nj->n", r, Si, r) + logdet) - np.log(cfg.modes))
        want = np.logaddexp(*dens) - np.log(len(tax.leaves()))
        assert np.allclose(lj[:, j], want, atol=1e-6)
    # within the vertical: leaves sum to one, a parent is the sum of its children
    post = np.exp(gen.class_log_posterior(x, v))
    c0 = tax.segments[v]
    assert np.allclose(post[:, np.asarray(leaves) - c0].sum(1), 1.0)
    p = tax.parent[leaves[0]]
    kids = [c for c in leaves if tax.parent[c] == p]
    assert np.allclose(post[:, p - c0], post[:, np.asarray(kids) - c0].sum(1))


def test_bayes_posterior_in_one_pass_is_the_per_vertical_one(tax):
    cfg = small_cfg(modes=2, mode_spread=0.5)
    gen = synthetic.SyntheticGenerator(tax, cfg, seed=3)
    x, _, _ = gen.make(np.repeat(tax.leaves(), 2), np.random.default_rng(4))
    log_z = gen.log_evidence(x)
    # log p(x) by brute force: every leaf of every vertical
    joint = np.concatenate([gen.leaf_log_joint(x, v) for v in range(tax.num_verticals)], axis=1)
    assert np.allclose(log_z, np.logaddexp.reduce(joint, axis=1), atol=1e-9)
    one_pass = gen.all_log_posteriors(x, dtype=np.float64)
    for v in range(tax.num_verticals):
        assert np.allclose(one_pass[v], gen.class_log_posterior(x, v, log_z), atol=1e-12)
    # every row's posteriors over all leaves sum to one
    total = sum(np.exp(one_pass[v][:, np.asarray([c for c in tax.leaves() if tax.vertical_of[c] == v])
                                    - tax.segments[v]]).sum(1) for v in range(tax.num_verticals))
    assert np.allclose(total, 1.0)


def test_parent_sums_by_runs_equal_the_membership_product():
    rng = np.random.default_rng(0)
    runs = 0
    for _ in range(3000):
        L, C = int(rng.integers(1, 12)), int(rng.integers(0, 5))
        member = np.zeros((L, C))
        for j in range(C):
            a = int(rng.integers(0, L))
            member[a:int(rng.integers(a, L)) + 1, j] = 1.0
        if C and rng.random() < 0.3:  # scattered leaves, overlaps, empty classes
            member[:, int(rng.integers(0, C))] = rng.random(L) < 0.4
        r = synthetic._ranges(member)
        if r is not None:
            runs += 1
            rel = rng.random((3, L))
            assert np.allclose(np.add.reduceat(rel, r[0], axis=1)[:, r[1]], rel @ member)
    assert runs > 300
    nested = np.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # a grandparent over a parent: no runs
    assert synthetic._ranges(nested) is None


def test_feature_rows_held_in_memory_are_the_shards(tmp_path, tax, monkeypatch):
    cfg = small_cfg()
    synthetic.write_synthetic(str(tmp_path), tax, cfg, seed=2)
    held, read = (FeatureShards(str(tmp_path / "train"), tax.num_classes) for _ in range(2))
    idx = np.random.default_rng(0).permutation(len(read))[:40]
    monkeypatch.setattr(FeatureShards, "IN_MEMORY_BYTES", 0)
    from_shards = read.inputs(idx).numpy()
    monkeypatch.undo()
    assert np.array_equal(held.inputs(idx).numpy(), from_shards)
    assert held._rows is not None and read._rows is None
    with pytest.raises(IndexError):
        held.inputs(np.array([len(held)]))
