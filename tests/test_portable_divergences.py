"""The portable chunked loss (kc_kernels/portable.py) in the modes kl, reverse_kl and jsd and with the options of
linear_cross_entropy (softcap, z-loss, uniform target), against the float64 reference: loss and the gradients of x,
weight and bias, for a dense teacher, a teacher head and sparse top-K targets; its memory bound; and a class split
over two simulated ranks whose statistics meet only through the reduce hook."""
from __future__ import annotations

import threading

import pytest
import torch

import kc_kernels
from kc_kernels import portable, reference
from kc_kernels.loss_modes import LossMode
from kc_kernels.ops.soft_target import SoftTargetProblem
from tests.helpers import assert_close, grads

F64 = torch.float64
V, H, HT = 37, 6, 5
BOUNDS = [0, 3, 25, 37]  # segment 1 (22 classes) spans several chunks of 7; chunks cross segment ends
CHUNK = 7


def _budget(mode: str, batch: int, chunk: int = CHUNK, dtype=F64) -> int:
    """The memory_budget that makes the portable walk use ``chunk`` classes per chunk."""
    elem = 8 if dtype == F64 else 4
    return chunk * portable.TERMS[LossMode.of(mode)].temporaries * elem * batch


def _inputs(B, form, seed, *, grouped=False, dtype=F64, K=5, logit_scale=1.0):
    """x, weight, bias (leaves made by the caller) and the targets of one form as keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    G = len(BOUNDS) - 1
    x = torch.randn(B, G, H, generator=g) if grouped else torch.randn(B, H, generator=g)
    data = dict(x=x * logit_scale, weight=torch.randn(V, H, generator=g) / H ** 0.5,
                bias=torch.randn(V, generator=g) * 0.5)
    if form == "dense":
        targets = dict(teacher_logits=torch.randn(B, V, generator=g) * 2)
    elif form == "head":
        tx = torch.randn(B, G, HT, generator=g) if grouped else torch.randn(B, HT, generator=g)
        targets = dict(teacher_x=tx * 2, teacher_weight=torch.randn(V, HT, generator=g) / HT ** 0.5,
                       teacher_bias=torch.randn(V, generator=g) * 0.5)
    else:  # top-K probabilities: -1 padding, a duplicate, a segment mass below 1 (the tail gets the rest)
        idx = torch.randint(-1, V, (B, K), generator=g)
        idx[:, 1] = idx[:, 0]
        targets = dict(target_index=idx, target_value=torch.rand(B, K, generator=g) * 0.3)
    cast = {k: v.to(dtype) for k, v in data.items()}
    targets = {k: v if k == "target_index" else v.to(dtype) for k, v in targets.items()}
    return cast, targets


def _leaves(data):
    return {k: v.detach().clone().requires_grad_(True) for k, v in data.items()}


def _problem(leaves, targets, *, mode, T=1.0, beta=0.5, reduction="mean", budget=None, **options):
    """A validated problem as the op front hands it to a backend, with the options set on it."""
    x = leaves["x"]
    p = SoftTargetProblem(batch=x.shape[0], num_classes=V, mode=mode, reduction=reduction, temperature=T, x=x,
                          weight=leaves["weight"], bias=leaves["bias"], beta=beta,
                          segments=torch.tensor(BOUNDS), bounds=list(BOUNDS), memory_budget=budget, **targets)
    for k, v in options.items():
        setattr(p, k, v)
    return p


def _check_against_reference(data, targets, *, mode, T=1.0, beta=0.5, reduction="mean", dtype=F64,
                             budget=None, **options):
    ref_leaves, mine = _leaves({k: v.to(F64) for k, v in data.items()}), _leaves(data)
    ref_targets = {k: v if k == "target_index" else v.to(F64) for k, v in targets.items()}
    ref = reference.linear_soft_target_loss(ref_leaves["x"], ref_leaves["weight"], ref_leaves["bias"], mode=mode,
                                            beta=beta, segments=torch.tensor(BOUNDS), temperature=T,
                                            reduction=reduction, **ref_targets, **options)
    got = portable.linear_soft_target_loss(_problem(mine, targets, mode=mode, T=T, beta=beta, reduction=reduction,
                                                    budget=budget or _budget(mode, data["x"].shape[0]), **options))
    assert got.shape == ref.shape and got.dtype == (F64 if dtype == F64 else torch.float32)
    assert_close(got, ref, dtype, "loss")
    names = list(mine)
    for name, a, b in zip(names, grads(got, [mine[n] for n in names]), grads(ref, [ref_leaves[n] for n in names])):
        assert a.dtype == dtype
        assert_close(a, b, dtype, f"d{name}")


def case(name, mode, form, B=5, T=1.0, beta=0.5, reduction="mean", grouped=False, logit_scale=1.0):
    return pytest.param(dict(mode=mode, form=form, B=B, T=T, beta=beta, reduction=reduction, grouped=grouped,
                             logit_scale=logit_scale), id=name)


CASES = [
    case("kl dense T=2", "kl", "dense", T=2.0),
    case("kl head, none", "kl", "head", reduction="none"),
    case("kl sparse, B=1", "kl", "sparse", B=1),
    case("kl head grouped T=2", "kl", "head", T=2.0, grouped=True),
    case("reverse_kl dense, none", "reverse_kl", "dense", reduction="none"),
    case("reverse_kl head T=2", "reverse_kl", "head", T=2.0),
    case("reverse_kl sparse T=2, none", "reverse_kl", "sparse", T=2.0, reduction="none"),
    case("reverse_kl sparse, B=1", "reverse_kl", "sparse", B=1),
    case("jsd dense beta 0.3", "jsd", "dense", beta=0.3),
    case("jsd dense beta 0.7 T=2, none", "jsd", "dense", beta=0.7, T=2.0, reduction="none"),
    case("jsd head beta 0.3 T=2", "jsd", "head", beta=0.3, T=2.0),
    case("jsd head grouped beta 0.7, B=1", "jsd", "head", beta=0.7, grouped=True, B=1),
    case("jsd sparse beta 0.3, none", "jsd", "sparse", beta=0.3, reduction="none"),
    case("jsd sparse beta 0.7 T=2", "jsd", "sparse", beta=0.7, T=2.0),
    case("jsd dense peaked (p underflows)", "jsd", "dense", beta=0.3, logit_scale=300.0),
    case("reverse_kl sparse peaked", "reverse_kl", "sparse", logit_scale=300.0),
]


@pytest.mark.parametrize("c", CASES)
def test_modes_match_the_reference_in_float64(c):
    for seed in (0, 1):  # fresh inputs twice
        data, targets = _inputs(c["B"], c["form"], seed, grouped=c["grouped"], logit_scale=c["logit_scale"])
        _check_against_reference(data, targets, mode=c["mode"], T=c["T"], beta=c["beta"], reduction=c["reduction"])


@pytest.mark.parametrize("mode,form,options", [
    ("softmax", "sparse", dict(softcap=2.5, z_loss=1e-2, uniform_target=0.1 / V)),
    ("softmax", "dense", dict(softcap=1.5)),
    ("softmax", "sparse", dict(z_loss=0.3)),
    ("kl", "sparse", dict(uniform_target=0.02, z_loss=1e-3)),
    ("kl", "head", dict(softcap=3.0, z_loss=1e-2, uniform_target=0.05 / V)),
    ("reverse_kl", "dense", dict(softcap=2.0)),
    ("jsd", "sparse", dict(softcap=2.0)),
])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_options_match_the_reference_in_float64(mode, form, options, reduction):
    """softcap, z_loss and uniform_target set on the problem, as linear_cross_entropy's front sets them."""
    data, targets = _inputs(4, form, 3)
    _check_against_reference(data, targets, mode=mode, T=1.0 if mode == "softmax" else 2.0, beta=0.3,
                             reduction=reduction, **options)


def test_segment_lse_on_request():
    data, targets = _inputs(3, "sparse", 4)
    leaves = _leaves(data)
    p = _problem(leaves, targets, mode="softmax", softcap=2.0, budget=_budget("softmax", 3))
    p.want_lse = True
    loss, lse = portable.linear_soft_target_loss(p)
    y = 2.0 * torch.tanh((data["x"] @ data["weight"].t() + data["bias"]) / 2.0)
    want = torch.stack([torch.logsumexp(y[:, a:b], dim=1) for a, b in zip(BOUNDS[:-1], BOUNDS[1:])], dim=1)
    assert lse.shape == (3, len(BOUNDS) - 1) and not lse.requires_grad
    assert_close(lse, want, F64, "lse")
    assert_close(loss, portable.linear_soft_target_loss(_problem(leaves, targets, mode="softmax", softcap=2.0)),
                 F64, "loss")
    p.mode = "sigmoid"
    assert portable.linear_soft_target_loss(p)[1].shape == (3, 0)


@pytest.mark.parametrize("mode,form", [("kl", "head"), ("jsd", "sparse")])
def test_float32_through_the_public_front(mode, form):
    """backend="portable" through kc_kernels.linear_soft_target_loss on float32 inputs, several chunks, against
    the float64 reference."""
    data, targets = _inputs(6, form, 5, dtype=torch.float32)
    mine, exact = _leaves(data), _leaves({k: v.double() for k, v in data.items()})
    kw = dict(mode=mode, beta=0.7, segments=torch.tensor(BOUNDS), temperature=2.0, reduction="sum")
    got = kc_kernels.linear_soft_target_loss(mine["x"], mine["weight"], mine["bias"], backend="portable",
                                             memory_budget=_budget(mode, 6, dtype=torch.float32), **targets, **kw)
    ref = reference.linear_soft_target_loss(
        exact["x"], exact["weight"], exact["bias"], **kw,
        **{k: v if k == "target_index" else v.double() for k, v in targets.items()})
    assert got.dtype == torch.float32
    assert_close(got, ref, torch.float32, "loss")
    for name, a, b in zip(mine, grads(got, list(mine.values())), grads(ref, list(exact.values()))):
        assert_close(a, b, torch.float32, f"d{name}")


def test_cross_entropy_options_through_the_public_front():
    """linear_cross_entropy (label smoothing, z-loss, softcap, ignored rows) on backend="portable"."""
    g = torch.Generator().manual_seed(6)
    x, w, b = torch.randn(7, H, generator=g, dtype=F64), torch.randn(V, H, generator=g, dtype=F64), None
    labels = torch.randint(0, V, (7,), generator=g)
    labels[2] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0)
    mine, exact = (x.clone().requires_grad_(True), w.clone().requires_grad_(True)), \
        (x.clone().requires_grad_(True), w.clone().requires_grad_(True))
    got = kc_kernels.linear_cross_entropy(*mine, b, labels, backend="portable", memory_budget=_budget("softmax", 7),
                                          **kw)
    ref = reference.linear_cross_entropy(*exact, b, labels=labels, **kw)
    assert_close(got, ref, F64, "loss")
    for a, e in zip(grads(got, list(mine)), grads(ref, list(exact))):
        assert_close(a, e, F64, "gradient")


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if torch.is_tensor(t) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("mode,form", [("jsd", "head"), ("reverse_kl", "sparse"), ("kl", "head")])
def test_memory_stays_within_a_chunk_of_logits(mode, form):
    """No tensor of the walk, forward or backward, exceeds a [B, chunk] block or a weight's size: never [B, V]
    (the teacher head's logits included)."""
    B, Hs, Vb, chunk = 32, 2, 512, 16
    g = torch.Generator().manual_seed(7)
    leaves = _leaves(dict(x=torch.randn(B, Hs, generator=g), weight=torch.randn(Vb, Hs, generator=g),
                          bias=torch.randn(Vb, generator=g)))
    if form == "head":
        targets = dict(teacher_x=torch.randn(B, Hs, generator=g), teacher_weight=torch.randn(Vb, Hs, generator=g))
    else:
        targets = dict(target_index=torch.randint(-1, Vb, (B, 5), generator=g),
                       target_value=torch.rand(B, 5, generator=g) * 0.2)
    pieces = [portable.Piece(0, 150, 0, 0), portable.Piece(150, Vb, 1, 1)]
    with _LargestTensor() as seen:
        rows = portable.soft_target_rows(leaves["x"], leaves["weight"], leaves["bias"], None, pieces=pieces,
                                         width=2, mode=mode, beta=0.3, chunk=chunk, z_loss=1e-3, **targets)
        rows.sum().backward()
    bound = max(B * chunk, Vb * Hs)
    assert seen.largest <= bound, f"{seen.op} made a tensor of {seen.largest} elements (bound {bound}, B*V {B * Vb})"
    assert all(v.grad is not None for v in leaves.values())


def test_reduce_hook_sees_the_tail_sums_of_a_top_k_teacher():
    data, targets = _inputs(4, "sparse", 8)
    calls = []

    def reduce(name, t, op="sum"):
        calls.append((name, op, tuple(t.shape)))
        return t

    leaves = _leaves(data)
    pieces = [portable.Piece(BOUNDS[g], BOUNDS[g + 1], g, g) for g in range(3)]
    rows = portable.soft_target_rows(leaves["x"], leaves["weight"], leaves["bias"], None, pieces=pieces, width=3,
                                     mode="jsd", chunk=CHUNK, reduce=reduce, **targets)
    assert calls == [("max", "max", (4, 3)), ("sum_exp", "sum", (4, 3)), ("target_mass", "sum", (4, 6))]
    rows.sum().backward()
    assert calls[3:] == [("grad_sum_exp", "sum", (4, 3))]


# ---------------------------------------------------------------------------------------- classes over two ranks

class _Ranks:
    """An all-reduce between threads, one per simulated rank: the reduce hook of each rank's walk."""

    def __init__(self, n):
        self.n, self.slots = n, [None] * n
        self.barrier = threading.Barrier(n, timeout=60)

    def hook(self, rank):
        def reduce(name, t, op="sum"):
            self.slots[rank] = (name, t.clone())
            self.barrier.wait()
            names = {s[0] for s in self.slots}
            assert names == {name}, f"ranks reduce different statistics: {names}"
            stacked = torch.stack([s[1] for s in self.slots])
            out = stacked.amax(0) if op == "max" else stacked.sum(0)
            self.barrier.wait()
            return out

        return reduce


RANGES = [(0, 14), (14, V)]  # segment 1 [3, 25) is cut; segment 0 lives on rank 0 only, segment 2 on rank 1


def _rank_pieces(lo, hi):
    out = []
    for g in range(len(BOUNDS) - 1):
        a, b = max(BOUNDS[g], lo), min(BOUNDS[g + 1], hi)
        if a < b:
            out.append(portable.Piece(a - lo, b - lo, g, g))  # every segment has a column (zeros where absent)
    return out


@pytest.mark.parametrize("mode,form,options", [
    ("kl", "dense", {}), ("kl", "sparse", dict(uniform_target=0.01)), ("reverse_kl", "head", {}),
    ("reverse_kl", "sparse", {}), ("jsd", "dense", {}), ("jsd", "sparse", {}), ("jsd", "head", dict(softcap=2.0)),
    ("softmax", "sparse", dict(softcap=2.0, z_loss=0.1, uniform_target=0.05 / V)),
])
def test_classes_split_over_ranks_meet_through_the_reduce_hook(mode, form, options):
    """Each rank walks its classes with its shard of weight, bias and teacher, and the statistics meet only in the
    hook: the summed rows and the gathered gradients equal the reference's."""
    B, T, beta = 4, 2.0, 0.3
    data, targets = _inputs(B, form, 9)
    ranks = _Ranks(len(RANGES))
    weights = torch.linspace(0.5, 1.5, B, dtype=F64)
    results, errors = [None] * len(RANGES), []

    def run(rank):
        try:
            lo, hi = RANGES[rank]
            x = data["x"].clone().requires_grad_(True)
            w = data["weight"][lo:hi].clone().requires_grad_(True)
            b = data["bias"][lo:hi].clone().requires_grad_(True)
            shard = dict(targets)
            if "teacher_logits" in shard:
                shard["teacher_logits"] = shard["teacher_logits"][:, lo:hi]
            if "teacher_weight" in shard:
                shard["teacher_weight"] = shard["teacher_weight"][lo:hi]
                shard["teacher_bias"] = shard["teacher_bias"][lo:hi]
            rows = portable.soft_target_rows(x, w, b, None, pieces=_rank_pieces(lo, hi), width=len(BOUNDS) - 1,
                                             mode=mode, temperature=T, beta=beta, target_offset=lo, chunk=5,
                                             reduce=ranks.hook(rank), **shard, **options)
            results[rank] = (rows.detach(), *torch.autograd.grad((rows * weights).sum(), [x, w, b]))
        except BaseException as e:  # noqa: BLE001 -- re-raised on the main thread
            errors.append(e)
            ranks.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(RANGES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    ref_leaves = _leaves(data)
    ref = reference.linear_soft_target_loss(ref_leaves["x"], ref_leaves["weight"], ref_leaves["bias"], mode=mode,
                                            beta=beta, segments=torch.tensor(BOUNDS), temperature=T,
                                            reduction="none", **targets, **options)
    assert_close(sum(r[0] for r in results), ref, F64, "rows")
    dx, dw, db = torch.autograd.grad((ref * weights).sum(), list(ref_leaves.values()))
    assert_close(sum(r[1] for r in results), dx, F64, "dx")
    assert_close(torch.cat([r[2] for r in results]), dw, F64, "dweight")
    assert_close(torch.cat([r[3] for r in results]), db, F64, "dbias")


@pytest.mark.parametrize("mode,form", [("kl", "dense"), ("reverse_kl", "sparse"), ("jsd", "dense")])
def test_given_logits_through_the_public_front(mode, form):
    """soft_target_loss's form (raw scores given, no bias) on backend="portable": the gradient reaches the logits."""
    data, targets = _inputs(5, form, 10)
    logits = (data["x"] @ data["weight"].t()).detach()
    mine, exact = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    kw = dict(mode=mode, beta=0.3, segments=torch.tensor(BOUNDS), temperature=2.0, reduction="none", **targets)
    got = kc_kernels.soft_target_loss(mine, backend="portable", memory_budget=_budget(mode, 5), **kw)
    ref = reference.soft_target_loss(exact, **kw)
    assert_close(got, ref, F64, "loss")
    assert_close(grads(got, [mine])[0], grads(ref, [exact])[0], F64, "dlogits")
