"""Crash safety of `kc run`: SIGKILL inside every stage, then --resume, gives the uninterrupted run's report;
damaged files are refused with their name; a failed write (full disk, unwritable --out) is a clear error that
leaves the previous file intact.

The report of a killed-and-resumed tiny run equals the uninterrupted one bit for bit, except the wall-clock
fields (stage_seconds, train_seconds, eval_seconds, ms_per_sample), which measure time and are left out of the
comparison. Every run uses one torch thread and the same seeds; resumed students restart from a checkpoint that
holds the model, Adam's state, the position in the epoch and the partial loss sums, and the batch order of an
epoch depends only on (seed, epoch), so the resumed arithmetic is the same sequence of operations.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from kc import checkpoint, cli, pipeline
from kc.cache import TeacherCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("stage_seconds", "train_seconds", "eval_seconds", "ms_per_sample")
ENV = dict(os.environ, PYTHONUNBUFFERED="1")
ENV.pop("KC_TEST_KILL_AT", None)


def kc_args(out, resume=False):
    """tiny with checkpoint_seconds: 0 (students checkpoint after every step, so kills land between mid-epoch
    checkpoints); a resume reads the config saved in out."""
    first = ["--preset", "tiny", "--config", os.path.join(ROOT, "tests", "data", "every-step.yaml")]
    return [sys.executable, "-m", "kc", "run", "--threads", "1", "--no-progress", "--out", out] + (
        ["--resume"] if resume else first)


def numbers(out):
    """results.json without the wall-clock fields, as canonical JSON text (NaN compares equal to itself)."""
    with open(os.path.join(out, "report", "results.json")) as f:
        res = json.load(f)
    res.pop("stage_seconds")
    res.pop("compute")  # wall seconds of the method and of each model's training
    for m in res["models"].values():
        for k in TIMING:
            m.pop(k, None)
    return json.dumps(res, sort_keys=True)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("crash") / "baseline")
    r = subprocess.run(kc_args(out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seconds = {s: v["seconds"] for s, v in checkpoint.read_json(os.path.join(out, "state.json"))["stages"].items()}
    return out, seconds


def _self_killing_chain(out, rng, log):
    """One SIGKILL inside each stage at a random crash point (just before an atomic write replaces its file,
    between shard files, after a cache batch), each followed by a resume that runs into the next stage's kill."""
    points = {"data": 9, "specialists": 4, "cache": 9, "student": 37, "eval": 9, "report": 3}  # tiny's crash points
    for i, stage in enumerate(pipeline.STAGES):
        n = int(rng.integers(1, points[stage] + 1))
        r = subprocess.run(kc_args(out, resume=i > 0), cwd=ROOT, env=dict(ENV, KC_TEST_KILL_AT=f"{stage}:{n}"),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == -signal.SIGKILL, (stage, n, r.returncode, r.stderr[-3000:])
        log.append((stage, n))
    r = subprocess.run(kc_args(out, resume=True), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _timed_kill_chain(out, rng, seconds, log):
    """SIGKILL from outside at a random moment after each stage's start line, then resume into the next one."""
    for i, stage in enumerate(pipeline.STAGES):
        p = subprocess.Popen(kc_args(out, resume=i > 0), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
        for line in p.stdout:
            if f"stage {stage} ..." in line:
                time.sleep(float(rng.uniform(0, max(seconds.get(stage) or 0.0, 0.02))))
                p.send_signal(signal.SIGKILL)
                break
        p.stdout.close()
        rc = p.wait(timeout=300)
        st = checkpoint.read_json(os.path.join(out, "state.json"))["stages"] if os.path.exists(
            os.path.join(out, "state.json")) else {}
        log.append((stage, rc, "inside" if not st.get(stage, {}).get("done") else "after it"))
    r = subprocess.run(kc_args(out, resume=True), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_kill_in_every_stage_and_resume_gives_the_same_report(baseline, tmp_path):
    base, seconds = baseline
    rng = np.random.default_rng(int(os.environ.get("KC_CRASH_SEED", time.time_ns() % 2**32)))
    hooked, timed = str(tmp_path / "hooked"), str(tmp_path / "timed")
    log_a, log_b, errors = [], [], []

    def chain_b():
        try:
            _timed_kill_chain(timed, np.random.default_rng(rng.integers(2**32)), seconds, log_b)
        except BaseException as e:  # noqa: BLE001 - re-raised below in the test's thread
            errors.append(e)

    t = threading.Thread(target=chain_b)  # the two chains run side by side (one torch thread each)
    t.start()
    try:
        _self_killing_chain(hooked, rng, log_a)
    finally:
        t.join()
    if errors:
        raise errors[0]
    print("kills at crash points:", log_a, "timed kills:", log_b)
    want = numbers(base)
    assert numbers(hooked) == want, log_a
    assert numbers(timed) == want, log_b
    for out in (hooked, timed):  # no temporary file or half-swapped stage folder is left behind
        assert not [f for _, _, fs in os.walk(out) for f in fs if checkpoint.is_temporary(f) or ".tmp" in f]
        assert not [d for d in os.listdir(out) if d.endswith((".kc-build", ".kc-old", ".kc-adopt"))]


# ---------------------------------------------------------------------------------------------- damaged files

def kc(*args):
    return cli.main(list(args) + ["--no-progress", "--preset", "tiny"])


@pytest.fixture
def run_copy(baseline, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(baseline[0], out)
    return out


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip(path):
    """One byte in the second half of the file (array data, or a tensor's bytes), inverted."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) * 3 // 4)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", [truncate, flip])
@pytest.mark.parametrize("rel, stage", [
    ("cache/index.npy", "student"),
    ("cache/value.npy", "student"),
    ("students/distilled-fc_sc.pt", "eval"),
    ("specialists/vertical-001.pt", "cache"),
    ("data/train/shard-00000.features.npy", "specialists"),
    ("data/test/shard-00000.indices.npy", "eval"),
])
def test_damaged_file_is_refused_with_its_name(run_copy, capsys, rel, stage, damage):
    path = os.path.join(run_copy, rel)
    damage(path)
    capsys.readouterr()
    # eval --resume would reuse the finished models' metrics: the stage is redone, so that it reads the files
    assert kc(stage, "--out", run_copy, *([] if stage == "eval" else ["--resume"])) == 2
    err = capsys.readouterr().err
    assert path in err and ("truncated" in err or "corrupted" in err or "unreadable" in err), err


def test_damaged_cache_is_refused_by_the_reader(run_copy):
    truncate(os.path.join(run_copy, "cache", "value.npy"))
    with pytest.raises(checkpoint.DamagedFile, match="value.npy"):
        TeacherCache(os.path.join(run_copy, "cache"))


def test_damaged_state_file_is_refused(run_copy, capsys):
    with open(os.path.join(run_copy, "state.json"), "w") as f:
        f.write('{"stages": {"data"')
    assert kc("run", "--out", run_copy, "--resume") == 2
    assert "state.json" in capsys.readouterr().err


def test_damaged_cache_is_rebuilt_by_its_stage(run_copy):
    """`kc cache --resume` over a damaged cache starts it over instead of continuing into the damaged arrays."""
    truncate(os.path.join(run_copy, "cache", "index.npy"))
    assert kc("cache", "--out", run_copy, "--resume") == 0
    TeacherCache(os.path.join(run_copy, "cache"))


# ---------------------------------------------------------------------------------------------- failed writes

def _enospc(*a, **k):
    raise OSError(28, "No space left on device")


def test_full_disk_keeps_the_previous_checkpoint(run_copy, monkeypatch):
    path = os.path.join(run_copy, "students", "generalist-fc_fc.pt")
    before = open(path, "rb").read()
    ck = checkpoint.load(path)
    ck["state"]["epoch"] = 99
    monkeypatch.setattr(checkpoint.os, "fsync", _enospc)
    with pytest.raises(checkpoint.WriteError, match="disk is full") as e:
        checkpoint.save(ck, path)
    assert path in str(e.value)
    monkeypatch.undo()
    assert open(path, "rb").read() == before and checkpoint.load(path)["state"]["epoch"] == 2
    assert sorted(os.listdir(os.path.dirname(path))) == sorted(f for f in os.listdir(os.path.dirname(path))
                                                               if not f.endswith(".tmp"))


def test_full_disk_during_a_stage_is_a_clear_error(run_copy, monkeypatch, capsys):
    ev = os.path.join(run_copy, "eval", "generalist-fc_fc.json")
    state = os.path.join(run_copy, "state.json")
    before = open(ev).read(), open(state).read()
    monkeypatch.setattr(checkpoint.os, "replace", _enospc)
    assert kc("eval", "--out", run_copy) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "cannot write" in err and os.path.join(run_copy, "eval") in err
    monkeypatch.undo()
    assert (open(ev).read(), open(state).read()) == before
    assert not [f for f in os.listdir(os.path.join(run_copy, "eval")) if f.endswith(".tmp")]


def test_unwritable_output_directory_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert kc("run", "--out", str(blocker / "out")) == 2
    err = capsys.readouterr().err
    assert str(blocker) in err and "Traceback" not in err


def test_checkpoints_without_header_still_load(tmp_path):
    p = str(tmp_path / "old.pt")
    torch.save({"a": torch.arange(3)}, p)
    assert checkpoint.load(p)["a"].tolist() == [0, 1, 2]
