"""The validation split and early stopping: drawn apart from train and test, a hold-out of real data's train/,
the stopping rule, the best epoch's weights kept (through a resume too), and the same AP as the test evaluation."""
import os

import numpy as np
import pytest
import torch

from kc import config, data, evaluate, synthetic, taxonomy, train, validation
from kc.data import FeatureShards, ShardWriter


@pytest.fixture(scope="module")
def tax():
    return taxonomy.generate(3, 30, seed=0)


@pytest.fixture(scope="module")
def written(tmp_path_factory, tax):
    d = tmp_path_factory.mktemp("val")
    cfg = config.load("tiny")
    synthetic.write_synthetic(str(d / "data"), tax, cfg.data, seed=0)
    return d, cfg


@pytest.mark.parametrize("n, c, ties, edge", [(37, 5, False, False), (64, 3, True, False), (1, 2, False, False),
                                              (50, 4, True, True)])
def test_block_ap_is_the_evaluations_ap(n, c, ties, edge):
    g = torch.Generator().manual_seed(n)
    S = torch.randn(n, c, generator=g)
    if ties:
        S = S.round()
        S[0, 0], S[1, 0] = -0.0, 0.0
    P = torch.rand(n, c, generator=g) < 0.3
    if edge:  # a class without positives, one whose every row is positive, one with a single positive
        P[:, 0], P[:, 1], P[:, 2] = False, True, False
        P[n // 2, 2] = True
    got = validation.block_ap(S, P)
    want = [evaluate.average_precision(S[:, j].numpy(), P[:, j].numpy()) for j in range(c)]
    np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)


def test_early_stopping_rule():
    s = validation.new_state()
    assert validation.update(s, 1, float("nan"), 2, 0.0)  # the first epoch is always the best so far
    assert validation.update(s, 2, 0.30, 2, 0.01)
    assert not validation.update(s, 3, 0.305, 2, 0.01)  # a gain within min_delta is none
    assert not s["stopped_early"]
    assert not validation.update(s, 4, 0.20, 2, 0.01)
    assert s["stopped_early"] and s["best_epoch"] == 2 and s["best_map"] == 0.30
    never = validation.new_state()
    for e, m in enumerate([0.5, 0.4, 0.3, 0.2], 1):
        validation.update(never, e, m, 0, 0.0)
    assert not never["stopped_early"] and never["best_epoch"] == 1


def test_validation_split_is_drawn_apart_and_leaves_train_and_test_alone(written, tax, tmp_path):
    d, cfg = written
    splits = {s: FeatureShards(str(d / "data" / s), tax.num_classes) for s in ("train", "val", "test")}
    assert len(splits["val"]) == len(tax.leaves()) * cfg.data.val_per_class
    x = {s: splits[s].inputs(np.arange(len(splits[s]))).numpy() for s in splits}
    for a, b in (("val", "train"), ("val", "test")):
        assert not (x[a][:, None, :] == x[b][None, :, :]).all(2).any()  # no row shared
    # without a validation split the train and test rows are the same as with one
    off = config.load("tiny", overrides={"data": {"val_per_class": 0}})
    synthetic.write_synthetic(str(tmp_path / "off"), tax, off.data, seed=0)
    assert not os.path.exists(tmp_path / "off" / "val")
    for s in ("train", "test"):
        other = FeatureShards(str(tmp_path / "off" / s), tax.num_classes)
        assert np.array_equal(other.inputs(np.arange(len(other))).numpy(), x[s])
        assert np.array_equal(other.labels.indices, splits[s].labels.indices)


def _shards(directory, rows, dim=4):
    w = ShardWriter(str(directory))
    feats = np.arange(rows * dim, dtype=np.float32).reshape(rows, dim)
    w.write(feats, np.arange(rows + 1), np.arange(rows) % 5)
    w.close({})


def test_real_data_holds_out_a_seeded_share_of_train_or_reads_val(tmp_path, tax):
    _shards(tmp_path / "train", 50)
    _shards(tmp_path / "test", 10)
    tr = data.open_real_split("features", str(tmp_path), "train", tax, 32, 0.2, seed=3)
    va = data.open_real_split("features", str(tmp_path), "val", tax, 32, 0.2, seed=3)
    assert (len(tr), len(va)) == (40, 10)
    a, b = tr.inputs(np.arange(40))[:, 0].numpy(), va.inputs(np.arange(10))[:, 0].numpy()
    assert sorted(np.concatenate([a, b]).tolist()) == [4.0 * i for i in range(50)]  # disjoint, together train/
    assert va.labels.indices.tolist() == [int(v // 4) % 5 for v in b]
    again = data.open_real_split("features", str(tmp_path), "val", tax, 32, 0.2, seed=3)
    assert np.array_equal(again.rows, va.rows)
    other = data.open_real_split("features", str(tmp_path), "val", tax, 32, 0.2, seed=4)
    assert not np.array_equal(other.rows, va.rows)
    assert data.open_real_split("features", str(tmp_path), "val", tax, 32, 0.0, seed=3) is None
    assert len(data.open_real_split("features", str(tmp_path), "train", tax, 32, 0.0, seed=3)) == 50
    _shards(tmp_path / "val", 7)  # a val/ folder is the validation split, and train/ is whole
    assert len(data.open_real_split("features", str(tmp_path), "val", tax, 32, 0.2, seed=3)) == 7
    assert len(data.open_real_split("features", str(tmp_path), "train", tax, 32, 0.2, seed=3)) == 50


def _student_run(written, tax, tmp_path, name, maps, fail_at=None, epochs=4, patience=1):
    """Trains generalist-fc_sc with a scripted validation mAP per epoch; returns (result, weights after each
    validation)."""
    d, _ = written
    cfg = config.load("tiny", overrides={"student": {"epochs": epochs}, "checkpoint_seconds": 0,
                                         "stopping": {"patience": patience}})
    tr = FeatureShards(str(d / "data" / "train"), tax.num_classes)
    va = FeatureShards(str(d / "data" / "val"), tax.num_classes)
    seen = []

    def scripted(model, *a, **k):
        if fail_at is not None and len(seen) + 1 == fail_at:
            raise KeyboardInterrupt
        seen.append(validation.copy_state(model))
        return maps[len(seen) - 1]

    real = validation.student_map
    validation.student_map = scripted
    try:
        res = train.train_student(cfg, tax, tr, "generalist-fc_sc", str(tmp_path / f"{name}.pt"), 0, val=va)
    finally:
        validation.student_map = real
    return res, seen


def test_early_stopping_keeps_the_best_epoch_and_survives_a_resume(written, tax, tmp_path):
    maps = [0.2, 0.5, 0.4, 0.9]
    res, seen = _student_run(written, tax, tmp_path, "a", maps)
    assert res["epoch"] == 3 and res["done"]  # patience 1: stopped after the first epoch without a gain
    rec = res["record"]
    assert rec["best_epoch"] == 2 and rec["stopped_early"] and rec["val_curve"] == maps[:3] and rec["epochs"] == 3
    for k, v in res["model"].state_dict().items():
        assert torch.equal(v, seen[1][k]), k  # the kept weights are epoch 2's
    with pytest.raises(KeyboardInterrupt):  # interrupted at the third validation: resumes from epoch 2's end
        _student_run(written, tax, tmp_path, "b", maps, fail_at=3)
    again, _ = _student_run(written, tax, tmp_path, "b", maps[2:])
    assert again["record"] == rec
    for k, v in again["model"].state_dict().items():
        assert torch.equal(v, res["model"].state_dict()[k]), k
    full, _ = _student_run(written, tax, tmp_path, "c", maps, patience=0)
    assert full["epoch"] == 4 and full["record"]["best_epoch"] == 4 and not full["record"]["stopped_early"]


def test_a_run_without_validation_trains_every_epoch(tmp_path):
    from kc import cli

    out = str(tmp_path / "o")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  val_per_class: 0\nstudent:\n  methods: [generalist]\n  heads: [fc_sc]\n")
    assert cli.main(["run", "--preset", "tiny", "--config", str(cfg), "--out", out, "--no-progress"]) == 0
    import json

    with open(os.path.join(out, "report", "results.json")) as f:
        res = json.load(f)
    assert res["num_val"] == 0
    t = res["models"]["generalist-fc_sc"]["training"]
    assert t["epochs"] == t["max_epochs"] == 2 and t["val_map"] is None
    assert res["compute"]["students"]["generalist-fc_sc"]["method_seconds"] >= 0
