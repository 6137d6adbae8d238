"""kc under torchrun (gloo, CPU): the sharded student against one process, checkpoints across process counts, and a
2-process `kc run` end to end.

- One step of the sharded student (output layer split by verticals, backbone data-parallel) gives one process's
  loss, gradients, health numbers and (gathered) optimizer state, for an FC-FC head, a grouped FC-SC head with a
  per-vertical scale and an SC-SC head with a per-class scale; the bytes it communicates are those step_bytes
  computes.
- A student interrupted under 2 processes resumes on 1 and on 3 and ends where an uninterrupted run ends.
- `torchrun --nproc-per-node 2 -m kc run --preset tiny` finishes, logs once, and reports the one-process numbers;
  killed inside its student stage, it is finished by one process with `--resume`, to the same numbers.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kc import checkpoint, cli, config, pipeline, train
from kc import distributed as kcdist
from kc.cache import TeacherCache
from kc.models import build_student
from kc.taxonomy import generate
from kc_kernels.distributed import count_communication

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = "self_paced-fc_sc"  # grouped hidden units and a scale: the most sharded state


def _init(rank, world, init_file, backend="gloo"):
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))


def _spawn(fn, world, *args):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(fn, args=(world, os.path.join(tmp, "init")) + args, nprocs=world, join=True)


def _close(a, b, what, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------ one step

STEP_CASES = [("fc_fc", "none"), ("fc_sc", "vertical"), ("sc_sc", "class")]


def _step_worker(rank, world, init_file, backend="gloo"):
    _init(rank, world, init_file, backend)
    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    try:
        cfg = config.load("tiny")
        tax = generate(4, 41, seed=3)
        B, D = 7, cfg.data.feature_dim  # 7 rows on 2 ranks: uneven row blocks
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, D, generator=g).to(dev)
        ti = torch.randint(-1, tax.num_classes, (B, 5), generator=g).to(dev)
        tv = torch.rand(B, 5, generator=g).to(dev)
        for head, scale in STEP_CASES:
            what = f"{head}/{scale} rank {rank}"
            torch.manual_seed(1)
            full = build_student(cfg, (D,), tax, head, scale)
            with torch.no_grad():
                full.head.bias.normal_(-2, 0.5)
                if full.log_scale is not None:
                    full.log_scale.add_(torch.randn(full.log_scale.shape, generator=g) * 0.3)
            full = full.to(dev)
            part = copy.deepcopy(full)
            shards = kcdist.StudentShards.shard(part)
            lo, hi = shards.class_range
            assert list(shards.verticals) == [v for v in range(4) if lo <= tax.segments[v] < hi], what

            ref = full.loss(x, ti, tv)
            ref.backward()
            with count_communication() as log:
                loss = shards.loss(part, x[torch.from_numpy(shards.my_rows(np.arange(B))).to(dev)], B, ti, tv)
                loss.backward()
                shards.reduce_gradients(part)
            _close(loss, ref, f"loss {what}")
            fp = dict(full.named_parameters())
            for name, p in part.named_parameters():
                want = fp[name].grad[lo:hi] if name in shards.sharded else fp[name].grad
                _close(p.grad, want, f"grad {name} {what}")

            measured = {}
            for k, n in log:
                measured[k] = measured.get(k, 0) + n
            expected = kcdist.step_bytes(full, B, world)
            expected = {k: v for k, v in expected.items() if k not in ("total", "logits_avoided")}
            assert measured == expected, f"bytes {what}: measured {measured}, computed {expected}"

            # the shard's logits (less the bias) are the one-process student's on its classes
            _close(shards.scores_minus_bias(part, x), (full.scores(x) - full.head.bias.detach())[:, lo:hi],
                   f"scores {what}")
            h_ref, h = train.health(full, x), shards.health(part, x)
            assert abs(h["dead"] - h_ref["dead"]) < 1e-9 and abs(h["spread"] - h_ref["spread"]) < 1e-5, (h, h_ref)

            # one Adam step each, then the gathered state is the one process's
            opt_full, opt_part = train._optimizer(cfg, full), train._optimizer(cfg, part)
            opt_full.step()
            opt_part.step()
            got = shards.full_state(part, opt_part)
            if rank == 0:
                msd, osd = got
                for k, v in full.state_dict().items():
                    _close(msd[k], v, f"gathered {k} {what}")
                ref_osd = opt_full.state_dict()
                for i, st in ref_osd["state"].items():
                    for k, v in st.items():
                        _close(osd["state"][i][k], v, f"gathered optimizer state {i}.{k} {what}")
            else:
                assert got is None
    finally:
        dist.destroy_process_group()


def test_sharded_student_step_equals_one_process():
    _spawn(_step_worker, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2
                    or not dist.is_nccl_available(), reason="needs 2 CUDA devices and NCCL")
def test_nccl_sharded_student_step_equals_one_process():
    _spawn(_step_worker, 2, "nccl")


def test_vertical_shards_hold_whole_verticals():
    segs = [0, 4, 20, 21, 30, 41]
    for w in range(1, 6):
        ranges = kcdist.vertical_shards(segs, w)
        assert ranges[0][0] == 0 and ranges[-1][1] == 41 and all(lo in segs and hi in segs for lo, hi in ranges)
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError, match="world_size"):
        kcdist.vertical_shards(segs, 6)
    assert kcdist.row_counts(7, 3) == [3, 2, 2] and kcdist.row_counts(1, 2) == [1, 0]


def test_bad_timeout_is_a_clear_error():
    with pytest.raises(config.ConfigError, match="dist_timeout"):
        config.load("tiny", overrides={"dist_timeout": 0})
    assert config.load("tiny", overrides={"dist_timeout": 90}).dist_timeout == 90.0


# ------------------------------------------------------------------------------------------ checkpoints

def _cfg():
    """tiny with a per-class scale (sharded with the output layer, Adam moments included) and 5 steps an epoch."""
    return config.load("tiny", overrides={"student": {"scale": "class", "batch_size": 32},
                                          "checkpoint_seconds": 0.0})  # a checkpoint after every step


def _train(out, path, stop_at=None):
    """Trains RUN into path; with stop_at, the call-th loss raises KeyboardInterrupt (every rank alike)."""
    cfg = _cfg()
    ws = pipeline.Workspace(out, cfg)
    tax, tr = ws.taxonomy(), ws.split("train")
    cache = TeacherCache(ws.cache_dir, ws.expected_cache())
    if stop_at is not None:
        real, calls = kcdist.StudentShards.loss, {"n": 0}

        def dying(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == stop_at:
                raise KeyboardInterrupt
            return real(self, *a, **k)

        kcdist.StudentShards.loss = dying
    try:
        train.train_student(cfg, tax, tr, RUN, path, cfg.seed, cache)
    except KeyboardInterrupt:
        assert stop_at is not None
    kcdist.barrier()


def _train_worker(rank, world, init_file, out, path, stop_at):
    _init(rank, world, init_file)
    try:
        _train(out, path, stop_at)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("kcdist") / "out")
    for stage in ("data", "specialists", "cache"):
        assert cli.main([stage, "--preset", "tiny", "--threads", "1", "--no-progress", "--out", out]) == 0
    return out


def test_checkpoint_of_two_processes_resumes_on_one_and_on_three(workspace):
    ref_path = os.path.join(workspace, "ref.pt")
    _train(workspace, ref_path)  # one process, uninterrupted
    ref = checkpoint.load(ref_path)
    assert ref["state"]["done"] and ref["state"]["epoch"] == 2

    part = os.path.join(workspace, "two.pt")
    _spawn(_train_worker, 2, workspace, part, 8)  # stops in the second epoch (5 steps an epoch)
    ck = checkpoint.load(part)
    assert (ck["state"]["epoch"], ck["state"]["step"], ck["state"]["done"]) == (1, 2, False)
    assert ck["model"]["head.weight"].shape == ref["model"]["head.weight"].shape  # whole, not a shard
    assert ck["optimizer"]["state"][len(ck["optimizer"]["state"]) - 1]["exp_avg"].shape == (30,)  # per-class scale

    for world in (1, 3):
        path = os.path.join(workspace, f"resumed-on-{world}.pt")
        shutil.copy(part, path)
        if world == 1:
            _train(workspace, path)
        else:
            _spawn(_train_worker, world, workspace, path, None)
        got = checkpoint.load(path)
        assert got["state"]["done"] and got["state"]["history"]["step"] == ref["state"]["history"]["step"]
        np.testing.assert_allclose(got["state"]["history"]["loss"], ref["state"]["history"]["loss"], rtol=1e-5)
        for k, v in ref["model"].items():
            _close(got["model"][k], v, f"{k} resumed on {world}", rtol=1e-4, atol=1e-5)
        for i, st in ref["optimizer"]["state"].items():
            for k, v in st.items():
                _close(got["optimizer"]["state"][i][k], v, f"Adam {i}.{k} resumed on {world}", rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ end to end

def _results(out):
    with open(os.path.join(out, "report", "results.json")) as f:
        return json.load(f)


def test_torchrun_two_processes_tiny_run_reports_the_one_process_numbers_and_resumes_on_one(tmp_path):
    two = str(tmp_path / "two")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "kc", "run", "--preset", "tiny", "--threads", "1", "--no-progress", "--out", two],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("stage student done") == 1  # rank 0 alone logs
    stages = checkpoint.read_json(os.path.join(two, "state.json"))["stages"]
    assert stages["specialists"]["processes"] == 2 and stages["student"]["processes"] == 2
    for f in ("results.md", "loss_curves.png", "map_per_vertical.png"):
        assert os.path.getsize(os.path.join(two, "report", f)) > 0

    one = str(tmp_path / "one")
    assert cli.main(["run", "--preset", "tiny", "--threads", "1", "--no-progress", "--out", one]) == 0
    a, b = _results(one), _results(two)
    assert list(a["models"]) == list(b["models"])
    for m in a["models"]:
        assert abs(a["models"][m]["map"] - b["models"][m]["map"]) < 1e-3, m
    for run in config.load("tiny").runs():
        x = checkpoint.load(os.path.join(one, "students", f"{run}.pt"))["model"]
        y = checkpoint.load(os.path.join(two, "students", f"{run}.pt"))["model"]
        for k in x:
            _close(y[k], x[k], f"{run} {k}", rtol=1e-4, atol=1e-5)
    for v in range(3):  # the teachers split over the ranks are the one process's
        x = checkpoint.load(os.path.join(one, "specialists", f"vertical-{v:03d}.pt"))["state"]
        y = checkpoint.load(os.path.join(two, "specialists", f"vertical-{v:03d}.pt"))["state"]
        for k in x:
            _close(y[k], x[k], f"teacher {v} {k}", rtol=1e-4, atol=1e-5)

    # killed inside the student stage under 2 processes (rank 0, the writer, at its 20th checkpoint write;
    # torchrun then stops rank 1), resumed by one process: the one-process report
    killed = str(tmp_path / "killed")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "kc", "run", "--preset", "tiny", "--config", os.path.join(ROOT, "tests", "data",
                        "every-step.yaml"), "--threads", "1", "--no-progress", "--out", killed],
                       cwd=ROOT, env=dict(env, KC_TEST_KILL_AT="student:20"),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode != 0 and not os.path.exists(os.path.join(killed, "report")), r.stdout[-3000:]
    stages = checkpoint.read_json(os.path.join(killed, "state.json"))["stages"]
    assert stages["cache"]["done"] and "student" not in stages
    assert cli.main(["run", "--preset", "tiny", "--threads", "1", "--no-progress", "--resume", "--out", killed]) == 0
    c = _results(killed)
    for m in a["models"]:
        assert abs(a["models"][m]["map"] - c["models"][m]["map"]) < 1e-3, m
