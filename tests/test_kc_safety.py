"""Run folders that never run code from a file, never delete what kc did not write, hold one run at a time, and
keep what they write durable: planted pickle payloads, foreign folders, a second process, hostile manifests."""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from kc import cache as cache_mod
from kc import checkpoint, cli, data, pipeline, runfolder, taxonomy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kc(*args):
    return cli.main(list(args) + ["--no-progress"])


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("kc: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("safety") / "run")
    assert kc("run", "--preset", "tiny", "--out", out) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(finished, out)
    return out


def tree(root):
    """Every path under root with its size and mtime: what 'nothing touched' compares."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size if name in files else None, st.st_mtime_ns)
    return out


# ---------------------------------------------------------------------------------------------- no code runs

class Payload:
    """Unpickling this creates a folder: the stand-in for any code a planted file could run."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def plant(path, target, header=True):
    buf = io.BytesIO()
    torch.save({"model": {}, "state": Payload(target)}, buf)
    payload = buf.getvalue()
    with open(path, "wb") as f:
        if header:  # a correct SHA-256: the digest only detects damage, it does not vouch for the content
            f.write(checkpoint.MAGIC + hashlib.sha256(payload).digest())
        f.write(payload)


@pytest.mark.parametrize("header", [True, False])
def test_planted_pickle_payload_is_refused_and_never_runs(run_copy, tmp_path, capsys, header):
    target = str(tmp_path / "created-by-payload")
    path = os.path.join(run_copy, "students", "distilled-fc_sc.pt")
    plant(path, target, header)
    with pytest.raises(checkpoint.DamagedFile, match="refused"):
        checkpoint.load(path)
    assert not os.path.exists(target)
    capsys.readouterr()
    assert kc("eval", "--out", run_copy) == 2
    err = one_line_error(capsys)
    assert path in err and "refused" in err
    assert not os.path.exists(target)


def test_every_checkpoint_kc_writes_loads_without_pickle(finished):
    """Teachers and students (with the optimizer's state) hold tensors and plain values only."""
    paths = [os.path.join(d, f) for d, _, fs in os.walk(finished) for f in fs if f.endswith(".pt")]
    assert len(paths) == 3 + 6
    for p in paths:
        blob = open(p, "rb").read()[len(checkpoint.MAGIC) + 32:]
        torch.load(io.BytesIO(blob), weights_only=True)
    with pytest.raises(TypeError, match="float64"):
        checkpoint.save({"lr": np.float64(0.1)}, os.path.join(finished, "never-written.pt"))
    assert not os.path.exists(os.path.join(finished, "never-written.pt"))


def test_pickled_arrays_in_cache_and_shards_are_refused(run_copy, tmp_path, capsys):
    """An object array (np.load would unpickle it) with digests that match: refused by name, nothing runs."""
    target = str(tmp_path / "created-by-payload")
    arr = np.empty((1,), dtype=object)
    arr[0] = Payload(target)
    for rel, manifest, stage in (("cache/index.npy", "cache/manifest.json", "student"),
                                 ("data/train/shard-00000.indices.npy", "data/train/index.json", "specialists")):
        path = os.path.join(run_copy, rel)
        np.save(path, arr, allow_pickle=True)
        mpath = os.path.join(run_copy, manifest)
        m = json.load(open(mpath))
        m["files"][os.path.basename(rel)] = {"bytes": os.path.getsize(path), "sha256": checkpoint.file_sha256(path)}
        json.dump(m, open(mpath, "w"))
        capsys.readouterr()
        assert kc(stage, "--out", run_copy, "--resume") == 2
        assert path in one_line_error(capsys)
        assert not os.path.exists(target)


def test_config_with_python_tags_is_refused(tmp_path, capsys):
    target = tmp_path / "created-by-config"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: !!python/object/apply:os.mkdir ['{target}']\n")
    assert kc("config", "--config", str(cfg)) == 2
    assert str(cfg) in one_line_error(capsys) and not target.exists()


# ---------------------------------------------------------------------------------------------- what kc did not write

def test_foreign_folder_is_refused_and_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "cache").mkdir(parents=True)
    (out / "cache" / "weights.bin").write_bytes(b"user data")
    (out / "notes").mkdir()
    (out / "notes" / "draft.tmp").write_text("half a thought")
    (out / "state.json.abcdefgh.tmp").write_text("looks like a temporary")
    before = tree(out)
    for args in (("run",), ("run", "--resume"), ("data",), ("cache", "--resume")):
        assert kc(*args, "--preset", "tiny", "--out", str(out)) == 2
        err = one_line_error(capsys)
        assert str(out) in err and "not made by kc" in err
    assert tree(out) == before


def test_out_naming_a_file_is_one_clear_line(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    assert kc("run", "--preset", "tiny", "--out", str(f)) == 2
    assert "is a file, not a folder" in one_line_error(capsys) and f.read_text() == "keep me"


def test_only_kc_temporaries_in_kc_folders_are_cleaned(run_copy, capsys):
    keep = [os.path.join(run_copy, "notes", "draft.tmp"), os.path.join(run_copy, "x.tmp"),
            os.path.join(run_copy, "eval", "mine.tmp"), os.path.join(run_copy, "notes", "a.abcdefgh.kc-tmp")]
    os.makedirs(os.path.join(run_copy, "notes"))
    for p in keep:
        open(p, "w").write("user's")
    gone = [os.path.join(run_copy, "state.json.abcdefgh.kc-tmp"),
            os.path.join(run_copy, "cache", "index.npy.k2j4_8xq.kc-tmp")]
    for p in gone:
        open(p, "w").write("a killed write")
    assert kc("run", "--out", run_copy, "--resume") == 0
    assert all(os.path.exists(p) for p in keep) and not any(os.path.exists(p) for p in gone)


def test_a_failed_rebuild_keeps_the_previous_stage(run_copy, monkeypatch, capsys):
    """`kc cache` rebuilds beside the old cache: a failure midway leaves the cache state.json vouches for."""
    cdir = os.path.join(run_copy, "cache")
    before = tree(cdir)
    real = cache_mod.build

    def failing(directory, *a, **k):
        real(directory, *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod, "build", failing)
    assert kc("cache", "--out", run_copy) == 2
    one_line_error(capsys)
    monkeypatch.undo()
    assert tree(cdir) == before
    ws = pipeline.Workspace(run_copy, __import__("kc.config").config.load("tiny"))
    assert ws.done("cache")
    cache_mod.TeacherCache(cdir, ws.expected_cache())
    # a later rebuild that completes replaces it whole, and no build folder stays behind
    assert kc("cache", "--out", run_copy) == 0
    assert sorted(os.listdir(cdir)) == ["index.npy", "manifest.json", "value.npy"]
    assert not [d for d in os.listdir(run_copy) if d.endswith(runfolder.BUILD)]


def test_a_swap_cut_between_its_renames_is_finished(tmp_path):
    out = str(tmp_path)
    for d, text in (("eval.kc-old", "old"), ("eval.kc-build", "new")):
        os.makedirs(os.path.join(out, d))
        open(os.path.join(out, d, "m.json"), "w").write(text)
    runfolder.recover(out, ["eval"])
    assert sorted(os.listdir(out)) == ["eval"] and open(os.path.join(out, "eval", "m.json")).read() == "new"


# ---------------------------------------------------------------------------------------------- one run per folder

def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    """Two processes: a `kc run` holds the folder; a second `kc run` on it is refused naming the first's PID;
    once the first is killed (SIGKILL: the kernel drops its lock) the folder can be taken again."""
    out = str(tmp_path / "o")
    long = tmp_path / "long.yaml"
    long.write_text("specialists: {epochs: 10000}\nstopping: {patience: 0}\n")  # holds the folder until killed
    holder = subprocess.Popen([sys.executable, "-m", "kc", "run", "--preset", "tiny", "--config", str(long),
                               "--no-progress", "--out", out], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        for line in holder.stdout:
            if "stage specialists ..." in line:
                break
        before = tree(out)
        for args in (["run", "--resume"], ["run"], ["eval"]):
            r = subprocess.run([sys.executable, "-m", "kc", *args, "--no-progress", "--out", out], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
            assert f"in use by another kc process (PID {holder.pid})" in r.stderr, r.stderr
        assert {k: v for k, v in tree(out).items() if "specialists" not in k} == {
            k: v for k, v in before.items() if "specialists" not in k}
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
    runfolder.lock(out)  # a lock left by a killed process never blocks
    runfolder.release(out)


# ---------------------------------------------------------------------------------------------- manifests

@pytest.mark.parametrize("name", ["/dev/zero", "../../outside.npy", "index.npy/../value.npy", "cache/index.npy"])
def test_cache_manifest_names_plain_files_only(run_copy, name):
    cdir = os.path.join(run_copy, "cache")
    mpath = os.path.join(cdir, "manifest.json")
    m = json.load(open(mpath))
    m["files"] = {name: m["files"]["index.npy"], "value.npy": m["files"]["value.npy"]}
    json.dump(m, open(mpath, "w"))
    t0 = time.time()
    with pytest.raises(checkpoint.DamagedFile, match="manifest.json"):
        cache_mod.TeacherCache(cdir)
    assert time.time() - t0 < 5


def test_cache_manifest_without_digests_is_refused(run_copy):
    cdir = os.path.join(run_copy, "cache")
    mpath = os.path.join(cdir, "manifest.json")
    m = json.load(open(mpath))
    m["files"]["value.npy"].pop("sha256")
    json.dump(m, open(mpath, "w"))
    with pytest.raises(checkpoint.DamagedFile, match="lacks its size or SHA-256"):
        cache_mod.TeacherCache(cdir)
    m.pop("files")
    json.dump(m, open(mpath, "w"))
    with pytest.raises(checkpoint.DamagedFile, match="does not list the digests"):
        cache_mod.TeacherCache(cdir)


@pytest.mark.parametrize("name", ["/dev/zero", "../shard-00000.features.npy", "shard-00009.features.npy/.."])
def test_shard_manifest_names_plain_files_only(run_copy, name):
    d = os.path.join(run_copy, "data", "train")
    ipath = os.path.join(d, "index.json")
    m = json.load(open(ipath))
    m["files"][name] = m["files"]["shard-00000.features.npy"]
    json.dump(m, open(ipath, "w"))
    with pytest.raises(data.DataError, match="index.json"):
        data.FeatureShards(d, 30)


def test_shard_manifest_without_digests_is_refused(run_copy):
    d = os.path.join(run_copy, "data", "train")
    ipath = os.path.join(d, "index.json")
    m = json.load(open(ipath))
    for bad in ({k: {"bytes": v["bytes"]} for k, v in m["files"].items()}, {}):
        json.dump(dict(m, files=bad), open(ipath, "w"))
        with pytest.raises(data.DataError, match="index.json"):
            data.FeatureShards(d, 30)


def test_a_device_in_place_of_a_shard_is_refused(tmp_path):
    d = tmp_path / "feats"
    d.mkdir()
    os.symlink("/dev/zero", d / "shard-00000.features.npy")
    with pytest.raises(data.DataError, match="not a regular file"):
        data.FeatureShards(str(d), 30)


# ---------------------------------------------------------------------------------------------- durable writes

def _record_syncs(monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file",
                       os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.realpath(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.parametrize("ext", [".csv", ".json"])
def test_taxonomy_save_is_atomic_and_synced(tmp_path, monkeypatch, ext):
    tax = taxonomy.generate(3, 30, seed=0)
    path = str(tmp_path / f"taxonomy{ext}")
    tax.save(path)
    before = open(path).read()
    events = _record_syncs(monkeypatch)
    taxonomy.generate(3, 31, seed=1).save(path)
    kinds = [k for k, _ in events]
    assert kinds == ["fsync-file", "replace", "fsync-dir"], events
    assert events[2][1] == os.path.realpath(str(tmp_path))
    monkeypatch.undo()
    assert taxonomy.load(path).num_classes == 31
    # a write that fails midway leaves the old file whole and no temporary
    tax.save(path)

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(checkpoint.WriteError, match=os.path.basename(path)):
        taxonomy.generate(3, 31, seed=1).save(path)
    monkeypatch.undo()
    assert open(path).read() == before and os.listdir(tmp_path) == [os.path.basename(path)]


def test_every_atomic_write_syncs_its_directory(tmp_path, monkeypatch):
    events = _record_syncs(monkeypatch)
    checkpoint.save({"a": torch.zeros(2)}, str(tmp_path / "c.pt"))
    checkpoint.write_json(str(tmp_path / "s.json"), {"a": 1})
    checkpoint.write_array(str(tmp_path / "x.npy"), np.zeros(3))
    for i in range(3):
        assert events[3 * i][0] == "fsync-file" and events[3 * i + 1][0] == "replace"
        assert events[3 * i + 2] == ("fsync-dir", os.path.realpath(str(tmp_path)))


def test_a_stage_swap_syncs_the_run_folder(tmp_path, monkeypatch):
    final = str(tmp_path / "eval")
    d = runfolder.begin(final, resume=False)
    open(os.path.join(d, "m.json"), "w").write("{}")
    events = _record_syncs(monkeypatch)
    runfolder.commit(final)
    assert events[-1] == ("fsync-dir", os.path.realpath(str(tmp_path)))
