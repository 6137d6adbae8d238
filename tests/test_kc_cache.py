import os

import numpy as np
import pytest
import torch

from kc import cache, checkpoint, config, data, synthetic, taxonomy, teachers
from kc.cache import CacheMismatch, TeacherCache


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    cfg = config.load("tiny", overrides={"specialists": {"epochs": 1}})
    tax = taxonomy.generate(3, 30, seed=0)
    synthetic.write_synthetic(str(d / "data"), tax, cfg.data, seed=0)
    train = data.FeatureShards(str(d / "data" / "train"), tax.num_classes)
    paths = teachers.train_specialists(cfg, tax, train, str(d / "teachers"), seed=0)
    return d, cfg, tax, train, paths


def _expected(setup, top_k=5):
    d, cfg, tax, train, paths = setup
    return cache.expected_manifest(tax, train, top_k, teachers.checksums(str(d / "teachers"), tax.num_verticals),
                                   data.fingerprint(train))


def test_specialists_saved_and_resumed(setup):
    d, cfg, tax, train, paths = setup
    assert len(paths) == tax.num_verticals and all(os.path.exists(p) for p in paths)
    before = [os.path.getmtime(p) for p in paths]
    teachers.train_specialists(cfg, tax, train, str(d / "teachers"), seed=0, resume=True)
    assert [os.path.getmtime(p) for p in paths] == before  # finished teachers are not redone


def test_cache_rows_are_the_teachers_top_k(setup, tmp_path):
    d, cfg, tax, train, _ = setup
    ts = teachers.load_specialists(cfg, tax, train.input_shape, str(d / "teachers"))
    m = cache.build(str(tmp_path), ts, tax, train, _expected(setup))
    assert m["complete"] and m["verticals_done"] == list(range(tax.num_verticals))
    c = TeacherCache(str(tmp_path), _expected(setup))
    assert c.index.dtype == np.int32 and c.value.dtype == np.float16
    idx = np.array([7, 0, 3])
    ti, tv = c.batch(idx)
    verts = train.verticals(tax)
    for k, i in enumerate(idx):
        v = verts[i]
        first = tax.segments[v]
        with torch.no_grad():
            p = torch.sigmoid(ts[v](train.inputs(np.array([i]))))[0]
        want_v, want_i = p.topk(5)
        assert ti[k].tolist() == (want_i + first).tolist()
        assert np.allclose(tv[k].numpy(), want_v.numpy(), atol=2e-3)
        assert all(tax.vertical_of[j] == v for j in ti[k].tolist())


def test_cache_refuses_mismatch(setup, tmp_path):
    d, cfg, tax, train, _ = setup
    ts = teachers.load_specialists(cfg, tax, train.input_shape, str(d / "teachers"))
    cache.build(str(tmp_path), ts, tax, train, _expected(setup))
    with pytest.raises(CacheMismatch, match="top_k"):
        TeacherCache(str(tmp_path), _expected(setup, top_k=4))
    other = _expected(setup)
    other["teachers"] = list(other["teachers"])
    other["teachers"][1] = "0" * 64
    with pytest.raises(CacheMismatch, match=r"verticals \[1\]"):
        TeacherCache(str(tmp_path), other)
    with pytest.raises(FileNotFoundError):
        TeacherCache(str(tmp_path / "nothing"))


def test_cache_resumes_after_interruption(setup, tmp_path):
    d, cfg, tax, train, _ = setup
    ts = teachers.load_specialists(cfg, tax, train.input_shape, str(d / "teachers"))
    calls = []

    class Dies(torch.nn.Module):
        def forward(self, x):
            raise KeyboardInterrupt

    broken = list(ts)
    broken[2] = Dies()
    with pytest.raises(KeyboardInterrupt):
        cache.build(str(tmp_path), broken, tax, train, _expected(setup))
    m = checkpoint.read_json(str(tmp_path / "manifest.json"))
    assert m["verticals_done"] == [0, 1] and not m["complete"]
    with pytest.raises(CacheMismatch, match="incomplete"):
        TeacherCache(str(tmp_path), _expected(setup))

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append(1)
            return self.inner(x)

    cache.build(str(tmp_path), [Counting(t) if i < 2 else t for i, t in enumerate(ts)], tax, train, _expected(setup))
    assert not calls  # finished verticals were kept
    TeacherCache(str(tmp_path), _expected(setup))


def test_cache_held_in_memory_gives_the_memmapped_rows(setup, tmp_path, monkeypatch):
    d, cfg, tax, train, _ = setup
    ts = teachers.load_specialists(cfg, tax, train.input_shape, str(d / "teachers"))
    cache.build(str(tmp_path), ts, tax, train, _expected(setup))
    idx = np.random.default_rng(1).permutation(len(train))[:17]
    held = TeacherCache(str(tmp_path))
    a = held.batch(idx)
    monkeypatch.setattr(TeacherCache, "IN_MEMORY_BYTES", 0)
    read = TeacherCache(str(tmp_path))
    b = read.batch(idx)
    assert held._held is not None and read._held is None
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)
