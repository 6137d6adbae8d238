import json
import os
import shlex
import subprocess
import sys

import pytest

from kc import checkpoint, cli, models, runfolder


def kc(*args):
    return cli.main(list(args) + ["--no-progress"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "out")
    assert kc("run", "--preset", "tiny", "--out", out) == 0
    return out


def test_run_writes_report(finished):
    rep = os.path.join(finished, "report")
    for f in ("results.md", "results.json", "loss_curves.png", "map_per_vertical.png"):
        assert os.path.getsize(os.path.join(rep, f)) > 0
    res = json.load(open(os.path.join(rep, "results.json")))
    runs = ["generalist-fc_fc", "generalist-fc_sc", "distilled-fc_fc", "distilled-fc_sc", "self_paced-fc_fc",
            "self_paced-fc_sc", "specialists", "bayes"]
    assert list(res["models"]) == runs
    for r in runs:
        m = res["models"][r]
        assert 0 <= m["map"] <= 1 and len(m["map_per_vertical"]) == 3 and 0 <= m["map_vertical_avg"] <= 1
        assert 0 <= m["top1"] <= m["top5"] <= 1
        if r != "bayes":
            assert m["parameters"] > 0 and m["ms_per_sample"] > 0
    # the Bayes posterior is the best any model can do (up to the noise of a small test split)
    assert res["models"]["bayes"]["map"] >= max(res["models"][r]["map"] for r in runs) - 0.02
    md = open(os.path.join(rep, "results.md")).read()
    assert "+D+S FC-SC" in md and "overall mAP" in md and "Specialists" in md


def test_run_refuses_used_directory_without_resume(finished, capsys):
    assert kc("run", "--preset", "tiny", "--out", finished) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_of_finished_run_skips_everything(finished, capsys):
    assert kc("run", "--preset", "tiny", "--out", finished, "--resume") == 0
    assert capsys.readouterr().out.count("already done, skipped") == 6


def test_resume_alone_reads_the_saved_config(finished, capsys):
    """`kc run --resume --out DIR`: the tiny run's config comes from DIR (the default preset would be refused as
    another config); a runtime key may differ."""
    assert kc("run", "--resume", "--out", finished) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 6
    assert kc("eval", "--resume", "--out", finished, "--threads", "2") == 0
    assert kc("run", "--resume", "--out", finished, "--preset", "default") == 2
    assert "another config" in capsys.readouterr().err


def test_other_config_in_same_directory_is_refused(finished, capsys):
    assert kc("run", "--preset", "tiny", "--seed", "9", "--out", finished, "--resume") == 2
    assert "another config" in capsys.readouterr().err


def test_stages_one_by_one(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert kc("cache", "--preset", "tiny", "--out", out) == 2
    assert "has not finished" in capsys.readouterr().err
    for stage in ("data", "specialists", "cache"):
        assert kc(stage, "--preset", "tiny", "--out", out) == 0
    # redoing a stage (here: one lost teacher) marks the later stages stale
    os.remove(os.path.join(out, "specialists", "vertical-001.pt"))
    assert kc("specialists", "--preset", "tiny", "--out", out, "--resume", "--seed", "0") == 0
    from kc import config, pipeline

    ws = pipeline.Workspace(out, config.load("tiny"))
    st = checkpoint.read_json(os.path.join(out, "state.json"))
    assert st["stages"]["cache"]["done"] is False
    for stage in ("cache", "student", "eval", "report"):
        assert kc(stage, "--preset", "tiny", "--out", out) == 0
    assert os.path.exists(os.path.join(ws.report_dir, "results.md"))


def test_resume_after_interrupted_student_stage(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "o")
    every_step = tmp_path / "every-step.yaml"
    every_step.write_text("checkpoint_seconds: 0\n")  # a checkpoint after every step
    real_loss = models.Student.loss
    calls = {"n": 0}

    def dying_loss(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 9:  # inside the second student run's first epoch
            raise KeyboardInterrupt
        return real_loss(self, *a, **k)

    monkeypatch.setattr(models.Student, "loss", dying_loss)
    assert kc("run", "--preset", "tiny", "--config", str(every_step), "--out", out) == 130
    err = capsys.readouterr().err
    st = checkpoint.read_json(os.path.join(out, "state.json"))["stages"]
    assert st["cache"]["done"] and "student" not in st
    building = os.path.join(out, "students.kc-build")  # the stage's folder is swapped in once complete
    partial = checkpoint.load(os.path.join(building, "generalist-fc_sc.pt"))["state"]
    assert not partial["done"] and partial["epoch"] * 3 + partial["step"] > 0
    assert not os.path.exists(os.path.join(out, "students"))
    teacher = os.path.join(out, "specialists", "vertical-000.pt")
    mtimes = os.path.getmtime(teacher), os.path.getmtime(os.path.join(building, "generalist-fc_fc.pt"))

    # the message gives the whole command: the config is read from the folder, no preset needed
    assert err.strip() == f"kc: interrupted; continue with: kc run --resume --out {out}"
    monkeypatch.setattr(models.Student, "loss", real_loss)
    calls["n"] = 0
    assert cli.main(shlex.split(err.split("continue with: ")[1])[1:] + ["--no-progress"]) == 0
    log = capsys.readouterr().out
    assert "stage specialists: already done" in log and "stage cache: already done" in log
    first_student = os.path.join(out, "students", "generalist-fc_fc.pt")
    assert (os.path.getmtime(teacher), os.path.getmtime(first_student)) == mtimes
    done = checkpoint.load(os.path.join(out, "students", "generalist-fc_sc.pt"))["state"]
    assert done["done"] and done["history"]["step"] == sorted(set(done["history"]["step"]))
    assert not os.path.exists(building)


@pytest.mark.parametrize("yaml_text, message", [
    ("student:\n  heads: [fc_xx]\n", "student.heads[0]"),
    ("student:\n  lr: -1\n", "student.lr"),
    ("bogus: 1\n", "unknown key"),
    ("data:\n  feature_dim: many\n", "data.feature_dim: expected an integer"),
    ("data:\n  kind: features\n", "data.path"),
    ("- a list\n", "top level must be a mapping"),
    ("student: [\n", "not valid YAML"),
])
def test_bad_config_is_a_clear_error(tmp_path, capsys, yaml_text, message):
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    assert kc("data", "--preset", "tiny", "--config", str(p), "--out", str(tmp_path / "o")) == 2
    assert message in capsys.readouterr().err


def test_unknown_preset_and_missing_config(tmp_path, capsys):
    assert kc("run", "--preset", "huge", "--out", str(tmp_path)) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert kc("run", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path)) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_real_data_is_a_clear_error(tmp_path, capsys):
    tax = tmp_path / "tax.csv"
    tax.write_text("class,vertical,parent\na,v,\nb,v,a\n")
    cfgp = tmp_path / "c.yaml"
    cfgp.write_text(f"taxonomy:\n  file: {tax}\ndata:\n  kind: features\n  path: {tmp_path / 'feats'}\n")
    assert kc("data", "--preset", "tiny", "--config", str(cfgp), "--out", str(tmp_path / "o")) == 2
    assert "no feature shards" in capsys.readouterr().err


def test_module_entry_point_prints_config():
    r = subprocess.run([sys.executable, "-m", "kc", "config", "--preset", "eft-100k"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "num_classes: 100000" in r.stdout and "num_verticals: 20" in r.stdout


def _real_taxonomy(tmp_path):
    p = tmp_path / "tax.json"
    rows = []
    for v in ("birds", "cars"):
        rows.append({"class": f"{v}", "vertical": v, "parent": ""})
        rows += [{"class": f"{v}/k{i}", "vertical": v, "parent": v} for i in range(3)]
    p.write_text(json.dumps(rows))
    return p, [r["class"] for r in rows if r["parent"]]


def test_pipeline_on_image_folders(tmp_path):
    import numpy as np
    from PIL import Image

    tax, leaves = _real_taxonomy(tmp_path)
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for k, name in enumerate(leaves):
            d = tmp_path / "images" / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = np.full((10, 10, 3), 40 * k, dtype=np.uint8) + rng.integers(0, 30, (10, 10, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"taxonomy: {{file: {tax}}}\ndata: {{kind: images, path: {tmp_path / 'images'}, image_size: 8}}\n"
                   "student: {backbone: cnn, backbone_hidden: [4], epochs: 1, heads: [fc_sc], "
                   "methods: [generalist, self_paced]}\nspecialists: {hidden: [4], epochs: 1}\n")
    out = tmp_path / "o"
    assert kc("run", "--preset", "tiny", "--config", str(cfg), "--out", str(out)) == 0
    res = json.load(open(out / "report" / "results.json"))
    # no val/ folder: data.val_fraction (10%) of train/ is held out for validation
    assert res["num_train"] == 22 and res["num_val"] == 2 and res["num_test"] == 12
    assert res["verticals"] == ["birds", "cars"]


def test_pipeline_on_feature_shards(tmp_path):
    import numpy as np

    from kc import taxonomy
    from kc.data import ShardWriter

    tax_path, _ = _real_taxonomy(tmp_path)
    tax = taxonomy.load(str(tax_path))
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 16)):
        w = ShardWriter(str(tmp_path / "feats" / split))
        for _ in range(2):
            fine = rng.choice(tax.leaves(), n // 2)
            lab = [tax.labels_of(int(c)) for c in fine]
            feats = rng.standard_normal((len(fine), 6)).astype(np.float32) + fine[:, None]
            w.write(feats, np.concatenate([[0], np.cumsum([len(x) for x in lab])]), np.concatenate(lab))
        w.close({})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"taxonomy: {{file: {tax_path}}}\ndata: {{kind: features, path: {tmp_path / 'feats'}}}\n"
                   "student: {epochs: 1, heads: [sc_sc, fc_sc_shared], methods: [distilled]}\n")
    out = tmp_path / "o"
    assert kc("run", "--preset", "tiny", "--config", str(cfg), "--out", str(out)) == 0
    res = json.load(open(out / "report" / "results.json"))
    assert list(res["models"]) == ["distilled-sc_sc", "distilled-fc_sc_shared", "specialists"]  # no Bayes: real data
    assert res["num_train"] == 36 and res["num_val"] == 4  # 10% of train/ held out for validation


def test_several_seeds_in_one_command(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("student: {heads: [fc_sc, fc_fc_matched], methods: [generalist, distilled], epochs: 1}\n"
                   "specialists: {epochs: 1}\neval: {bayes: false}\n")
    out = tmp_path / "o"
    assert kc("run", "--preset", "tiny", "--config", str(cfg), "--seeds", "3,4", "--out", str(out)) == 0
    summary = json.load(open(out / "summary.json"))
    assert summary["seeds"] == [3, 4] and (out / "seed-3" / "report" / "results.json").exists()
    names = [d["name"] for d in summary["differences"]]
    assert "+D FC-SC - Generalist FC-SC" in names and "+D FC-SC - +D FC-FC(=)" in names
    md = (out / "summary.md").read_text()
    assert "95% CI" in md and "Specialists" in md
    assert kc("run", "--preset", "tiny", "--seeds", "1,1", "--out", str(out)) == 2
    assert "appears twice" in capsys.readouterr().err


def test_a_run_made_before_a_config_key_existed_still_resumes(tmp_path):
    """A key added to the config later takes its default when an older run's config.yaml is compared; a real
    difference is still refused, naming the key."""
    import yaml

    from kc import config, pipeline

    cfg = config.load()
    old = cfg.to_dict()
    old["taxonomy"].pop("source", None)
    (tmp_path / runfolder.MARKER).write_text("")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    pipeline.Workspace(str(tmp_path), cfg).open()
    old["seed"] = cfg.seed + 1
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(pipeline.StageError, match="differs in: seed"):
        pipeline.Workspace(str(tmp_path), cfg).open()
