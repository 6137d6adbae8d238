"""The vocab-parallel op against the single-process op: loss and every gradient, in 2 and 3 gloo processes.

Each world size is spawned once and runs a list of cases (process start-up dominates the cost); a failing case
raises in the worker with its name, and spawn re-raises it here.
"""
from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kc_kernels
from kc_kernels.distributed import communication_bytes, count_communication, shard_classes, split_segments
from tests.helpers import assert_close, make_problem

B, H, V = 6, 8, 29
SMALL_BUDGET = 1500  # a few columns per block, so the split-segment path walks several blocks


def case(name, mode="sigmoid", target_form="sparse", scale_kind=None, G=5, shards="aligned", reduction="mean",
         sample_weight=False, grouped=False, temperature=1.0, seed=0, x_rows=None):
    """x_rows: x sharded by rows (counts per rank), all-gathered by the op and dx reduce-scattered."""
    return dict(name=name, mode=mode, target_form=target_form, scale_kind=scale_kind, G=G, shards=shards,
                reduction=reduction, sample_weight=sample_weight, grouped=grouped, temperature=temperature, seed=seed,
                x_rows=x_rows)


CASES = {
    2: [
        case("sigmoid aligned", reduction="mean"),
        case("softmax aligned, segment scale, weights", mode="softmax", scale_kind="segment", reduction="sum",
             sample_weight=True, temperature=2.0, seed=1),
        case("softmax aligned, dense, class scale", mode="softmax", target_form="dense", scale_kind="class",
             reduction="none", seed=2),
        case("sigmoid split, dense, segment scale", target_form="dense", scale_kind="segment", shards="even",
             seed=3),
        case("softmax split, grouped", mode="softmax", shards=[(0, 12), (12, V)], reduction="none", grouped=True,
             seed=4),
        case("softmax one segment split", mode="softmax", G=None, shards="even", temperature=1.5, seed=5),
        case("sigmoid split, grouped, class scale", scale_kind="class", shards=[(0, 10), (10, V)], grouped=True,
             reduction="sum", seed=6),
        case("softmax split, rows sharded, segment scale", mode="softmax", scale_kind="segment",
             shards=[(0, 12), (12, V)], reduction="none", seed=14, x_rows=[4, 2]),
        case("sigmoid aligned, rows sharded, grouped", grouped=True, reduction="sum", sample_weight=True, seed=15,
             x_rows=[3, 3]),
    ],
    3: [
        case("softmax uneven split, dense, segment scale, weights", mode="softmax", target_form="dense",
             scale_kind="segment", shards=[(0, 4), (4, 21), (21, V)], reduction="sum", sample_weight=True,
             temperature=2.0, seed=7),
        case("softmax uneven split, class scale", mode="softmax", scale_kind="class", shards=[(0, 13), (13, 15),
             (15, V)], seed=8),
        case("sigmoid split, grouped, class scale", scale_kind="class", shards="even", grouped=True,
             reduction="none", seed=9),
        case("sigmoid aligned uneven", shards="aligned", reduction="sum", sample_weight=True, seed=10),
        case("softmax segment over 3 ranks, segment scale", mode="softmax", scale_kind="segment", G=None,
             shards=[(0, 5), (5, 9), (9, V)], seed=11),
        case("softmax aligned, dense, grouped", mode="softmax", target_form="dense", grouped=True, seed=12),
        case("softmax split, dense, grouped, segment scale", mode="softmax", target_form="dense",
             scale_kind="segment", grouped=True, shards="even", reduction="none", temperature=0.7, seed=13),
        case("softmax split, dense, rows sharded, a rank without rows", mode="softmax", target_form="dense",
             shards="even", seed=16, x_rows=[4, 0, 2]),
    ],
}


def _ranges(c, bounds, world):
    if isinstance(c["shards"], list):
        return c["shards"]
    return shard_classes(bounds if c["shards"] == "aligned" else V, world)


def _leaves(p):
    out = {"x": p["x"], "weight": p["weight"], "bias": p["bias"]}
    if "scale" in p:
        out["scale"] = p["scale"]
    return {k: v.detach().clone().requires_grad_(True) for k, v in out.items()}


def _backward(loss, reduction):
    # a fixed, uneven upstream gradient, so that per-row scaling of the gradient is checked too
    up = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape) if reduction == "none" else torch.tensor(1.0)
    (loss * up).sum().backward()


def _run_case(rank, world, c):
    p = make_problem(B, H, V, G=c["G"], K=4, grouped=c["grouped"], dtype=torch.float32,
                     gen=torch.Generator().manual_seed(c["seed"]), scale_kind=c["scale_kind"],
                     target_form=c["target_form"], sample_weight=c["sample_weight"])
    segments = p.get("segments")
    bounds = [0, V] if segments is None else segments.tolist()
    opts = dict(mode=c["mode"], segments=segments, temperature=c["temperature"],
                sample_weight=p.get("sample_weight"), reduction=c["reduction"])
    targets = ({"teacher_logits": p["teacher_logits"]} if c["target_form"] == "dense"
               else {"target_index": p["target_index"], "target_value": p["target_value"]})

    full = _leaves(p)
    ref = kc_kernels.linear_soft_target_loss(full["x"], full["weight"], full["bias"], scale=full.get("scale"),
                                             **targets, **opts, backend="cpu")
    _backward(ref, c["reduction"])

    ranges = _ranges(c, bounds, world)
    assert bool(split_segments(bounds, ranges)) == ("split" in c["name"] or "over" in c["name"]), c["name"]
    lo, hi = ranges[rank]
    mine = _leaves(p)
    shard = {"weight": mine["weight"].detach()[lo:hi].clone().requires_grad_(True),
             "bias": mine["bias"].detach()[lo:hi].clone().requires_grad_(True)}
    scale = mine.get("scale")
    if c["scale_kind"] == "class":
        scale = scale.detach()[lo:hi].clone().requires_grad_(True)
    if c["target_form"] == "dense":
        targets = {"teacher_logits": p["teacher_logits"][:, lo:hi]}
    x, full_dx, sharded = mine["x"], full["x"].grad, {}
    if c["x_rows"] is not None:
        r0 = sum(c["x_rows"][:rank])
        rows = slice(r0, r0 + c["x_rows"][rank])
        x = mine["x"].detach()[rows].clone().requires_grad_(True)
        full_dx, sharded = full_dx[rows], {"x_rows": c["x_rows"]}
    with count_communication() as log:
        loss = kc_kernels.vocab_parallel_linear_soft_target_loss(
            x, shard["weight"], shard["bias"], class_range=(lo, hi), num_classes=V, scale=scale,
            **targets, **opts, memory_budget=SMALL_BUDGET, **sharded)
        _backward(loss, c["reduction"])

    what = f"[{c['name']}, rank {rank}/{world}, ranges {ranges}]"
    assert_close(loss, ref, torch.float32, f"loss {what}")
    assert_close(x.grad, full_dx, torch.float32, f"dx {what}")
    assert_close(shard["weight"].grad, full["weight"].grad[lo:hi], torch.float32, f"dW {what}")
    assert_close(shard["bias"].grad, full["bias"].grad[lo:hi], torch.float32, f"dbias {what}")
    if c["scale_kind"] == "segment":
        assert_close(scale.grad, full["scale"].grad, torch.float32, f"dscale {what}")
    elif c["scale_kind"] == "class":
        assert_close(scale.grad, full["scale"].grad[lo:hi], torch.float32, f"dscale {what}")

    expected = communication_bytes(B, H, V, world, segments=bounds, class_ranges=ranges, mode=c["mode"],
                                   scale=c["scale_kind"], dense_teacher=c["target_form"] == "dense",
                                   grouped=c["grouped"], x_rows=c["x_rows"])
    measured = {}
    for name, n in log:
        measured[name] = measured.get(name, 0) + n
    expected = {k: v for k, v in expected.items() if k not in ("total", "logits_avoided")}
    assert measured == expected, f"bytes {what}: measured {measured}, computed {expected}"


SAMPLED_CASES = {
    # (name, labels per row (0: [B]), given samples, sampler, unique, remove hits, subtract log q, shards, reduction)
    2: [("given, one label", 0, True, "log_uniform", True, True, True, "even", "mean"),
        ("drawn, 3 labels with padding, weights", 3, False, "uniform", False, True, True, [(0, 7), (7, V)], "sum"),
        ("drawn unigram, no hit removal, no log q", 2, False, "unigram", True, False, False, "even", "none")],
    3: [("drawn, uneven shards", 2, False, "log_uniform", True, True, True, [(0, 3), (3, 20), (20, V)], "mean"),
        ("given, one rank without negatives", 0, True, "uniform", True, True, True, [(0, 9), (9, 10), (10, V)],
         "none")],
}
NUM_SAMPLED = 9


def _run_sampled_case(rank, world, c):
    from kc_kernels import samplers
    from kc_kernels.distributed import vocab_parallel_sampled_softmax_loss

    name, T, given, sampler, unique, hits, log_q, shards, reduction = c
    g = torch.Generator().manual_seed(len(name))
    x = torch.randn(B, H, generator=g)
    w = torch.randn(V, H, generator=g) / H ** 0.5
    bias = torch.randn(V, generator=g) * 0.3
    counts = torch.randint(1, 20, (V,), generator=g).double()
    if T == 0:
        labels = torch.randint(0, V, (B,), generator=g)
    else:
        labels = torch.randint(0, V, (B, T), generator=g)
        labels[1:, -1] = -1  # padding; row 0 keeps all T
    weight_rows = torch.rand(B, generator=g) + 0.5 if reduction == "sum" else None
    # the candidates of the reference: the same draw rank 0 makes from the same seed
    cand = samplers.sample_candidates(sampler, NUM_SAMPLED, V, unique=unique, class_counts=counts,
                                      generator=torch.Generator().manual_seed(7))
    sampled = (cand.ids, cand.expected_count(labels, NUM_SAMPLED, unique),
               cand.expected_count(cand.ids, NUM_SAMPLED, unique))
    opts = dict(remove_accidental_hits=hits, subtract_log_q=log_q, sample_weight=weight_rows, reduction=reduction)
    full = [t.clone().requires_grad_(True) for t in (x, w, bias)]
    ref = kc_kernels.sampled_softmax_loss(*full, labels, sampled=sampled, **opts, backend="reference")
    _backward(ref, reduction)

    ranges = shards if isinstance(shards, list) else shard_classes(V, world)
    lo, hi = ranges[rank]
    mine = [x.clone().requires_grad_(True), w[lo:hi].clone().requires_grad_(True),
            bias[lo:hi].clone().requires_grad_(True)]
    draw = (dict(sampled=sampled) if given else
            dict(num_sampled=NUM_SAMPLED, sampler=sampler, unique=unique, class_counts=counts,
                 generator=torch.Generator().manual_seed(7) if rank == 0 else None))
    with count_communication() as log:
        loss = vocab_parallel_sampled_softmax_loss(*mine, labels, class_range=(lo, hi), num_classes=V, **draw,
                                                   **opts)
        _backward(loss, reduction)
    what = f"[sampled {name}, rank {rank}/{world}, ranges {ranges}]"
    assert_close(loss, ref, torch.float32, f"loss {what}")
    assert_close(mine[0].grad, full[0].grad, torch.float32, f"dx {what}")
    assert_close(mine[1].grad, full[1].grad[lo:hi], torch.float32, f"dW {what}")
    assert_close(mine[2].grad, full[2].grad[lo:hi], torch.float32, f"dbias {what}")
    measured = {}
    for k, n in log:
        measured[k] = measured.get(k, 0) + n
    expected = {"class_ranges": world * 16, "max": B * 4, "sum_exp_and_true": B * 2 * 4, "grad_x": B * H * 4}
    if not given:
        expected["sampled_ids"] = (NUM_SAMPLED + 1) * 8
    assert measured == expected, f"bytes {what}: measured {measured}, expected {expected}"


def _worker(rank, world, init_file, case_names):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for c in CASES[world]:
            if case_names is None or c["name"] in case_names:
                _run_case(rank, world, c)
        for c in SAMPLED_CASES[world]:
            if case_names is None or c[0] in case_names:
                _run_sampled_case(rank, world, c)
    finally:
        dist.destroy_process_group()


def _spawn(world, case_names=None):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), case_names), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_single_process(world):
    _spawn(world)


def test_shard_classes_aligns_to_segments_and_covers_all_classes():
    bounds = [0, 3, 10, 11, 20, 29]
    ranges = shard_classes(bounds, 3)
    assert ranges[0][0] == 0 and ranges[-1][1] == 29
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))
    assert all(lo in bounds for lo, _ in ranges)
    assert split_segments(bounds, ranges) == []
    assert shard_classes(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_classes(bounds, 3, align=False) == [(0, 10), (10, 19), (19, 29)]
    # fewer segments than ranks: the cut falls inside a segment, which the op merges across ranks
    assert split_segments([0, 29], shard_classes([0, 29], 2)) == [0]
    with pytest.raises(ValueError, match="segments_or_classes"):
        shard_classes(2, 3)


def test_single_process_without_process_group_equals_the_op(gen):
    p = make_problem(B, H, V, G=4, dtype=torch.float32, gen=gen, scale_kind="segment")
    common = dict(target_index=p["target_index"], target_value=p["target_value"], mode="softmax",
                  segments=p["segments"], scale=p["scale"])
    ref = kc_kernels.linear_soft_target_loss(p["x"], p["weight"], p["bias"], **common, backend="cpu")
    got = kc_kernels.vocab_parallel_linear_soft_target_loss(p["x"], p["weight"], p["bias"], class_range=(0, V),
                                                            num_classes=V, **common)
    assert_close(got, ref, torch.float32, "loss")


def test_bad_class_range_is_a_value_error(gen):
    p = make_problem(B, H, V, dtype=torch.float32, gen=gen)
    with pytest.raises(ValueError, match="weight_shard"):
        kc_kernels.vocab_parallel_linear_soft_target_loss(p["x"], p["weight"], class_range=(0, 10), num_classes=V,
                                                          target_index=p["target_index"],
                                                          target_value=p["target_value"])
    with pytest.raises(ValueError, match="class_range"):  # one process must hold all classes
        kc_kernels.vocab_parallel_linear_soft_target_loss(p["x"], p["weight"][:10], class_range=(0, 10),
                                                          num_classes=V, target_index=p["target_index"],
                                                          target_value=p["target_value"])
    kw = dict(class_range=(0, V), num_classes=V, target_index=p["target_index"], target_value=p["target_value"])
    for rows, arg in (([B, 1], "x_rows"), ([B + 1], "x"), ("six", "x_rows"), ([0], "x_rows")):
        with pytest.raises(ValueError, match=f"^{arg}:"):
            kc_kernels.vocab_parallel_linear_soft_target_loss(p["x"], p["weight"], x_rows=rows, **kw)
    one = kc_kernels.vocab_parallel_linear_soft_target_loss(p["x"], p["weight"], x_rows=[B], **kw)
    assert_close(one, kc_kernels.linear_soft_target_loss(p["x"], p["weight"], target_index=p["target_index"],
                                                         target_value=p["target_value"]), torch.float32, "x_rows")


def test_bytes_per_step_are_a_small_fraction_of_the_logits():
    b = communication_bytes(4096, 512, 100_000, 4, segments=None, mode="sigmoid")
    assert b["total"] < b["logits_avoided"] / 100


def _nccl_worker(rank, world, init_file):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        dev = torch.device("cuda", rank)
        g = torch.Generator().manual_seed(0)
        Bn, Hn, Vn = 64, 128, 4099
        bounds = [0, 1000, 1500, 3001, Vn]
        x = torch.randn(Bn, Hn, generator=g)
        w = torch.randn(Vn, Hn, generator=g) / Hn ** 0.5
        bias = torch.randn(Vn, generator=g) * 0.5
        idx = torch.randint(-1, Vn, (Bn, 8), generator=g)
        val = torch.rand(Bn, 8, generator=g)
        scale = torch.rand(len(bounds) - 1, generator=g) * 3 + 0.5
        kw = dict(target_index=idx, target_value=val, mode="softmax", segments=torch.tensor(bounds))
        leaves = [t.clone().requires_grad_(True) for t in (x, w, bias, scale)]
        ref = kc_kernels.linear_soft_target_loss(*leaves[:3], scale=leaves[3], **kw, backend="cpu")
        ref.backward()
        for align in (True, False):  # aligned shards, then even shards that split segments
            lo, hi = shard_classes(bounds, world, align=align)[rank]
            mine = [x.to(dev), w[lo:hi].to(dev), bias[lo:hi].to(dev), scale.to(dev)]
            mine = [t.clone().requires_grad_(True) for t in mine]
            loss = kc_kernels.vocab_parallel_linear_soft_target_loss(
                mine[0], mine[1], mine[2], class_range=(lo, hi), num_classes=Vn, scale=mine[3],
                **{k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in kw.items()})
            loss.backward()
            assert_close(loss, ref, torch.float32, f"loss align={align}")
            assert_close(mine[0].grad, leaves[0].grad, torch.float32, f"dx align={align}")
            assert_close(mine[1].grad, leaves[1].grad[lo:hi], torch.float32, f"dW align={align}")
            assert_close(mine[2].grad, leaves[2].grad[lo:hi], torch.float32, f"dbias align={align}")
            assert_close(mine[3].grad, leaves[3].grad, torch.float32, f"dscale align={align}")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2
                    or not dist.is_nccl_available(), reason="needs 2 CUDA devices and NCCL")
def test_nccl_vocab_parallel_matches_single_process():
    world = min(torch.cuda.device_count(), 4)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_nccl_worker, args=(world, os.path.join(tmp, "init")), nprocs=world, join=True)


def test_sampled_softmax_without_process_group_equals_the_op_and_checks_its_arguments(gen):
    from kc_kernels.distributed import vocab_parallel_sampled_softmax_loss

    x, w, bias = torch.randn(B, H, generator=gen), torch.randn(V, H, generator=gen), torch.randn(V, generator=gen)
    labels = torch.randint(0, V, (B,), generator=gen)
    ref = kc_kernels.sampled_softmax_loss(x, w, bias, labels, num_sampled=6,
                                          generator=torch.Generator().manual_seed(3), backend="reference")
    got = vocab_parallel_sampled_softmax_loss(x, w, bias, labels, class_range=(0, V), num_classes=V, num_sampled=6,
                                              generator=torch.Generator().manual_seed(3))
    assert_close(got, ref, torch.float32, "loss")
    common = dict(class_range=(0, V), num_classes=V, num_sampled=6)
    with pytest.raises(ValueError, match="weight_shard"):
        vocab_parallel_sampled_softmax_loss(x, w[:5], bias, labels, **common)
    with pytest.raises(ValueError, match="labels"):
        vocab_parallel_sampled_softmax_loss(x, w, bias, torch.full((B, 2), -1), **common)
    with pytest.raises(ValueError, match="num_sampled"):
        vocab_parallel_sampled_softmax_loss(x, w, bias, labels, class_range=(0, V), num_classes=V, num_sampled=0)
    with pytest.raises(ValueError, match="class_range"):
        vocab_parallel_sampled_softmax_loss(x, w[:10], bias[:10], labels, class_range=(0, 10), num_classes=V,
                                            num_sampled=6)
