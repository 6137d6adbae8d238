"""The portable chunked loss (kc_kernels/portable.py) against the float64 reference: loss and every gradient, over
a table of modes, target forms, scales, layouts and odd shapes; its memory bound; its reduce hook."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kc_kernels
from kc_kernels import portable, reference
from tests.helpers import assert_close, grads, make_problem


def case(name, mode="sigmoid", form="sparse", scale_kind=None, grouped=False, G=None, B=5, V=37, K=4,
         temperature=1.0, reduction="mean", sample_weight=False, chunk=8, duplicates=False):
    return pytest.param(dict(mode=mode, form=form, scale_kind=scale_kind, grouped=grouped, G=G, B=B, V=V, K=K,
                             temperature=temperature, reduction=reduction, sample_weight=sample_weight,
                             chunk=chunk, duplicates=duplicates), id=name)


# V = 37 is no multiple of any chunk here, and every case has -1 padding among its targets
CASES = [
    case("sigmoid sparse"),
    case("sigmoid sparse, segment scale, grouped, B=1", scale_kind="segment", grouped=True, G=4, B=1),
    case("sigmoid dense, class scale, T=2, sum, weights", form="dense", scale_kind="class", G=3, temperature=2.0,
         reduction="sum", sample_weight=True),
    case("sigmoid sparse, segment scale, duplicates, none", scale_kind="segment", G=5, reduction="none",
         duplicates=True, chunk=5),
    case("softmax sparse, segment scale, T=1.5, none, weights", mode="softmax", scale_kind="segment", G=5,
         temperature=1.5, reduction="none", sample_weight=True),
    case("softmax dense, one segment, T=0.7", mode="softmax", form="dense", temperature=0.7),
    case("softmax dense, segment scale, grouped", mode="softmax", form="dense", scale_kind="segment",
         grouped=True, G=4, chunk=5),
    case("softmax sparse, class scale, grouped, B=1, one chunk", mode="softmax", scale_kind="class", grouped=True,
         G=3, B=1, chunk=64),
    case("softmax dense, class scale, chunk 1, sum", mode="softmax", form="dense", scale_kind="class", G=6,
         chunk=1, reduction="sum", V=13),
    case("softmax sparse, no bias term beyond K=1", mode="softmax", G=2, K=1, duplicates=False),
]


def _problem(c, seed=0):
    p = make_problem(c["B"], 6, c["V"], G=c["G"], K=c["K"], grouped=c["grouped"], dtype=torch.float64,
                     gen=torch.Generator().manual_seed(seed), scale_kind=c["scale_kind"], target_form=c["form"],
                     sample_weight=c["sample_weight"])
    if c["duplicates"]:
        p["target_index"][:, 1] = p["target_index"][:, 0]  # duplicates add up
    return p


def _leaves(p):
    return {k: p[k].detach().clone().requires_grad_(True) for k in ("x", "weight", "bias", "scale") if k in p}


def _targets(p):
    return {k: p[k] for k in ("target_index", "target_value", "teacher_logits") if k in p}


def _portable_loss(p, leaves, c, reduce=portable.no_reduce):
    bounds = p["segments"].tolist() if "segments" in p else [0, c["V"]]
    pieces = [portable.Piece(bounds[g], bounds[g + 1], g, g) for g in range(len(bounds) - 1)]
    rows = portable.soft_target_rows(leaves["x"], leaves["weight"], leaves["bias"], leaves.get("scale"),
                                     pieces=pieces, width=len(pieces), mode=c["mode"],
                                     temperature=c["temperature"], scale_per_segment=c["scale_kind"] == "segment",
                                     chunk=c["chunk"], reduce=reduce, **_targets(p))
    return reference.reduce_loss(rows, p.get("sample_weight"), c["reduction"])


@pytest.mark.parametrize("c", CASES)
def test_loss_and_gradients_match_the_reference_in_float64(c):
    for seed in (0, 1):  # fresh inputs twice
        p = _problem(c, seed)
        ref_leaves, mine = _leaves(p), _leaves(p)
        ref = reference.linear_soft_target_loss(
            ref_leaves["x"], ref_leaves["weight"], ref_leaves["bias"], scale=ref_leaves.get("scale"),
            mode=c["mode"], segments=p.get("segments"), temperature=c["temperature"],
            sample_weight=p.get("sample_weight"), reduction=c["reduction"], **_targets(p))
        got = _portable_loss(p, mine, c)
        assert got.dtype == torch.float64 and got.shape == ref.shape
        assert_close(got, ref, torch.float64, "loss")
        names = list(ref_leaves)
        for name, a, b in zip(names, grads(got, [mine[n] for n in names]), grads(ref, [ref_leaves[n] for n in names])):
            assert_close(a, b, torch.float64, f"d{name} (seed {seed})")


@pytest.mark.parametrize("mode,form,scale_kind", [("sigmoid", "sparse", "class"), ("softmax", "dense", "segment"),
                                                  ("softmax", "sparse", None)])
def test_given_logits_match_the_reference(mode, form, scale_kind):
    """soft_target_loss's form: the raw scores given, no bias; the gradient reaches the logits and the scale."""
    p = make_problem(4, 3, 23, G=3, K=3, dtype=torch.float64, gen=torch.Generator().manual_seed(5),
                     scale_kind=scale_kind, target_form=form)
    logits = (p["x"] @ p["weight"].t()).detach()
    a = {"logits": logits.clone().requires_grad_(True)}
    b = {"logits": logits.clone().requires_grad_(True)}
    if scale_kind:
        a["scale"], b["scale"] = (p["scale"].clone().requires_grad_(True) for _ in range(2))
    ref = reference.soft_target_loss(b["logits"], scale=b.get("scale"), mode=mode, segments=p["segments"],
                                     temperature=1.3, reduction="none", **_targets(p))
    bounds = p["segments"].tolist()
    rows = portable.soft_target_rows(None, None, None, a.get("scale"), logits=a["logits"],
                                     pieces=[portable.Piece(bounds[g], bounds[g + 1], g, g) for g in range(3)],
                                     width=3, mode=mode, temperature=1.3, scale_per_segment=scale_kind == "segment",
                                     chunk=4, **_targets(p))
    assert_close(rows, ref, torch.float64, "loss")
    for name, ga, gb in zip(a, grads(rows, list(a.values())), grads(ref, list(b.values()))):
        assert_close(ga, gb, torch.float64, f"d{name}")


def test_half_precision_inputs_compute_in_fp32_and_return_input_dtype_gradients():
    p = make_problem(3, 8, 29, G=2, dtype=torch.float64, gen=torch.Generator().manual_seed(2), scale_kind="segment")
    c = dict(V=29, mode="softmax", temperature=1.0, scale_kind="segment", chunk=7, reduction="mean")
    half = {k: p[k].to(torch.bfloat16).requires_grad_(True) for k in ("x", "weight", "bias", "scale")}
    loss = _portable_loss(p, half, c)
    assert loss.dtype == torch.float32
    loss.backward()
    exact = {k: v.detach().double().requires_grad_(True) for k, v in half.items()}
    ref = reference.linear_soft_target_loss(exact["x"], exact["weight"], exact["bias"], scale=exact["scale"],
                                            mode="softmax", segments=p["segments"], **_targets(p))
    ref.backward()
    assert_close(loss, ref, torch.bfloat16, "loss")
    for k in half:
        assert half[k].grad.dtype == torch.bfloat16
        assert_close(half[k].grad, exact[k].grad, torch.bfloat16, f"d{k}")


class _LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op makes (forward and backward run on this thread on CPU)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if torch.is_tensor(t) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("mode,form,scale_kind,grouped", [("sigmoid", "sparse", "segment", False),
                                                          ("softmax", "dense", "class", False),
                                                          ("softmax", "sparse", "segment", True)])
def test_memory_stays_within_a_chunk_of_logits(mode, form, scale_kind, grouped):
    """No tensor of the walk, forward or backward, is larger than a [B, chunk] block, the weight's gradient
    [V, H] or x's [B, G, H]: never [B, V] (here 32 times a chunk). A dense teacher [B, V] is an input, not made."""
    B, H, V, G, chunk = 64, 2, 1024, 4, 32
    p = make_problem(B, H, V, G=G, K=5, grouped=grouped, dtype=torch.float32, gen=torch.Generator().manual_seed(3),
                     scale_kind=scale_kind, target_form=form)
    leaves = _leaves(p)
    c = dict(V=V, mode=mode, temperature=1.0, scale_kind=scale_kind, chunk=chunk, reduction="sum")
    with _LargestTensor() as seen:
        _portable_loss(p, leaves, c).backward()
    bound = max(B * chunk, V * H, B * G * H)
    assert seen.largest <= bound, f"{seen.op} made a tensor of {seen.largest} elements (bound {bound}, B*V {B * V})"
    assert all(leaves[k].grad is not None for k in leaves)


def test_reduce_hook_sees_each_statistic_and_its_gradient_once():
    p = make_problem(4, 3, 19, G=3, dtype=torch.float64, gen=torch.Generator().manual_seed(4), scale_kind="segment",
                     target_form="dense")
    calls = []

    def reduce(name, t, op="sum"):
        calls.append((name, op, tuple(t.shape)))
        return t

    c = dict(V=19, mode="softmax", temperature=1.0, scale_kind="segment", chunk=4, reduction="sum")
    loss = _portable_loss(p, _leaves(p), c, reduce)
    assert calls == [("sum_of_squares", "sum", (4, 3)), ("max", "max", (4, 6)), ("sum_exp", "sum", (4, 6))]
    loss.backward()
    assert calls[3:] == [("grad_sum_exp", "sum", (4, 3)), ("grad_sum_of_squares", "sum", (4, 3))]


def test_terms_table_has_one_row_per_mode():
    from kc_kernels.loss_modes import LossMode

    assert set(portable.TERMS) == set(LossMode)
    assert portable.TERMS[LossMode.SOFTMAX].segment_lse and not portable.TERMS[LossMode.SIGMOID].segment_lse
    for mode in LossMode:  # the softmax family reads the segment's lse; the divergences read the teacher's log z
        assert portable.TERMS[mode].segment_lse == mode.terms.segment_lse
        assert portable.TERMS[mode].log_target == (mode in (LossMode.REVERSE_KL, LossMode.JSD))


@pytest.mark.parametrize("given_logits", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_portable_backend_through_the_op_front(given_logits, reduction):
    """backend="portable" through the public ops: the front's checks, sample weights and reductions, and a
    memory_budget small enough for several chunks, against the reference backend."""
    p = make_problem(6, 5, 31, G=3, K=4, dtype=torch.float32, gen=torch.Generator().manual_seed(8),
                     scale_kind="segment", sample_weight=True)
    kw = dict(mode="softmax", segments=p["segments"], temperature=1.7, sample_weight=p["sample_weight"],
              reduction=reduction, **_targets(p))
    losses, grad_sets = [], []
    for backend in ("portable", "reference"):
        leaves = _leaves(p)
        if given_logits:
            leaves = {"logits": (leaves["x"] @ leaves["weight"].t()).detach().requires_grad_(True),
                      "scale": leaves["scale"]}
            loss = kc_kernels.soft_target_loss(leaves["logits"], scale=leaves["scale"], backend=backend,
                                               memory_budget=6 * 8 * 4 * 5, **kw)
        else:
            loss = kc_kernels.linear_soft_target_loss(leaves["x"], leaves["weight"], leaves["bias"],
                                                      scale=leaves["scale"], backend=backend,
                                                      memory_budget=6 * 8 * 4 * 5, **kw)
        losses.append(loss)
        grad_sets.append(grads(loss, list(leaves.values())))
    assert losses[0].dtype == torch.float32 and losses[0].shape == losses[1].shape
    assert_close(losses[0], losses[1], torch.float32, "loss")
    for a, b in zip(*grad_sets):
        assert_close(a, b, torch.float32, "gradient")
    with pytest.raises(ValueError, match="^scale"):
        kc_kernels.linear_soft_target_loss(p["x"], p["weight"], scale=torch.ones(2), backend="portable", **kw)
