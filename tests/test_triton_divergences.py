"""The triton backend's divergence modes (kl, reverse_kl, jsd) and the options of softmax/kl (softcap, z-loss, a
uniform target) against the float64 definition (kc_kernels.reference): the reference runs on float64 copies of the
float32 inputs the backend gets; the loss and every gradient (x, weight, bias; logits) are compared.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py), so the shapes are small.
Layouts: several segments; a segment longer than a chunk (memory_budget=1 gives chunks of MIN_CHUNK classes: the
linear op walks it in row blocks, given logits in one walk per phase: TEACHER, STATS, MIX, FINAL), with B=33 in a
few cases, making two row blocks (of 32 and 1 rows); B=1. Teachers: dense logits, a teacher head (its logits made
per chunk, column 0 = the chunk's first class) and sparse top-K probabilities (filled in as a dense teacher under
reverse_kl/jsd, sparse targets under kl).
The options are not arguments of the public soft-target ops, so they are tested through the custom op
kc_kernels::chunked_soft_target, which takes them as [beta, softcap, z_loss, uniform_target].
"""
import math

import pytest
import torch

import kc_kernels
from kc_kernels import reference
from kc_kernels.chunked import chunked_soft_target
from kc_kernels.layout import MIN_CHUNK, plan_chunks
from tests.helpers import assert_close, grads

pytest.importorskip("triton")

F32 = torch.float32
MODES = ("kl", "reverse_kl", "jsd")
TEACHERS = ("dense", "head", "topk")

# B, H, V, segment bounds (None: one segment), temperature, beta, reduction, memory_budget
CASES = {
    "segments": (5, 10, 523, [0, 17, 230, 523], 2.0, 0.3, "sum", None),
    "long_segment": (6, 8, 700, [0, 60, 650, 700], 2.0, 0.7, "mean", 1),
    "single_row": (1, 9, 400, [0, 150, 400], 1.0, 0.7, "none", None),
}
ROW_BLOCKS = (33, 8, 600, [0, 560, 600], 2.0, 0.3, "mean", 1)  # (the interpreter pays per row: a few cases only)
LINEAR = ("x", "weight", "bias")


def _f32(t):
    """A float32 tensor and the float64 tensor of the same values."""
    t = t.float()
    return t, t.double()


def _problem(case, teacher, seed):
    """(float64 kwargs for the reference, float32 kwargs for the backend, shared kwargs); x/weight/bias require
    gradients."""
    B, H, V, bounds, T, beta, reduction, _ = CASES[case] if case in CASES else ROW_BLOCKS
    g = torch.Generator().manual_seed(seed)
    p32, p64 = {}, {}
    for k, t in (("x", torch.randn(B, H, generator=g) * 1.5),
                 ("weight", torch.randn(V, H, generator=g) * (2 / math.sqrt(H))),
                 ("bias", torch.randn(V, generator=g) * 0.5)):
        p32[k], p64[k] = _f32(t)
    if teacher == "dense":
        p32["teacher_logits"], p64["teacher_logits"] = _f32(torch.randn(B, V, generator=g) * 2)
    elif teacher == "head":
        Ht = H + 3
        for k, t in (("teacher_x", torch.randn(B, Ht, generator=g)),
                     ("teacher_weight", torch.randn(V, Ht, generator=g) * (2 / math.sqrt(Ht))),
                     ("teacher_bias", torch.randn(V, generator=g) * 0.5)):
            p32[k], p64[k] = _f32(t)
    else:  # top-K probabilities (-1 padding; duplicates add up), at most 0.9 of each row's mass
        idx = torch.randint(-1, V, (B, 6), generator=g)
        p32["target_index"] = p64["target_index"] = idx
        p32["target_value"], p64["target_value"] = _f32(torch.rand(B, 6, generator=g) * 0.15)
    for p in (p32, p64):
        if bounds is not None:
            p["segments"] = torch.tensor(bounds)
        for k in LINEAR:
            p[k] = p[k].clone().requires_grad_()
    return p64, p32, dict(temperature=T, beta=beta, reduction=reduction)


def _compare(out, ref, tensors32, tensors64, names):
    assert_close(out, ref, F32, "loss")
    for name, a, e in zip(names, grads(out, tensors32), grads(ref, tensors64)):
        assert_close(a, e, F32, f"d{name}")


def _logits_pair(p32):
    """The problem's logits x W^T + bias as the input of soft_target_loss (float32, and its float64 copy)."""
    with torch.no_grad():
        lg32 = torch.addmm(p32["bias"], p32["x"], p32["weight"].t())
    return lg32.double().requires_grad_(), lg32.requires_grad_()


def test_the_long_cases_walk_a_segment_in_chunks_and_row_blocks():
    for B, _, V, bounds, *_ in (CASES["long_segment"], ROW_BLOCKS):
        assert any(len(step) > 1 for step in plan_chunks(bounds, MIN_CHUNK, False))  # at memory_budget=1
    assert ROW_BLOCKS[0] > 32  # row blocks of at least 32 rows: two of them


@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_linear_matches_reference(mode, case, teacher):
    seed = 100 + 10 * MODES.index(mode) + list(CASES).index(case) + 1000 * TEACHERS.index(teacher)
    p64, p32, kw = _problem(case, teacher, seed)
    ref = reference.linear_soft_target_loss(**p64, mode=mode, **kw)
    out = kc_kernels.linear_soft_target_loss(**p32, mode=mode, backend="triton", memory_budget=CASES[case][-1],
                                             **kw)
    _compare(out, ref, [p32[k] for k in LINEAR], [p64[k] for k in LINEAR], LINEAR)


@pytest.mark.parametrize("mode,teacher", [("reverse_kl", "topk"), ("jsd", "head")])
def test_linear_in_two_row_blocks(mode, teacher):
    """Each row block's teacher chunk is its rows of the head's (or top-K teacher's) logits."""
    p64, p32, kw = _problem("row_blocks", teacher, 300 + 10 * MODES.index(mode))
    ref = reference.linear_soft_target_loss(**p64, mode=mode, **kw)
    out = kc_kernels.linear_soft_target_loss(**p32, mode=mode, backend="triton", memory_budget=1, **kw)
    _compare(out, ref, [p32[k] for k in LINEAR], [p64[k] for k in LINEAR], LINEAR)


@pytest.mark.parametrize("teacher", ["dense", "topk"])
@pytest.mark.parametrize("mode", MODES)
def test_logits_walked_per_phase_match_reference(mode, teacher):
    """soft_target_loss on given logits: the segment longer than a chunk is walked once per phase (TEACHER, STATS,
    MIX, FINAL), each call reading its chunk of the logits (and of a filled top-K teacher) again."""
    p64, p32, kw = _problem("long_segment", teacher, 5000 + 10 * MODES.index(mode))
    lg64, lg32 = _logits_pair(p32)
    tk = ("teacher_logits", "target_index", "target_value", "segments")
    ref = reference.soft_target_loss(lg64, **{k: p64[k] for k in tk if k in p64}, mode=mode, **kw)
    out = kc_kernels.soft_target_loss(lg32, **{k: p32[k] for k in tk if k in p32}, mode=mode, backend="triton",
                                      memory_budget=1, **kw)
    _compare(out, ref, [lg32], [lg64], ("logits",))


def test_jsd_beta_limits_and_sample_weight():
    """jsd with beta 0 and 1 is kl and reverse_kl (the front maps them); sample weights."""
    p64, p32, kw = _problem("segments", "dense", 77)
    sw = torch.rand(CASES["segments"][0], generator=torch.Generator().manual_seed(3)) + 0.5
    for beta in (0.0, 1.0):
        kw["beta"] = beta
        ref = reference.linear_soft_target_loss(**p64, mode="jsd", sample_weight=sw.double(), **kw)
        out = kc_kernels.linear_soft_target_loss(**p32, mode="jsd", sample_weight=sw, backend="triton", **kw)
        _compare(out, ref, [p32[k] for k in LINEAR], [p64[k] for k in LINEAR], LINEAR)


@pytest.mark.parametrize("mode", ["kl", "jsd"])
def test_masked_teacher_classes(mode):
    """A teacher logit of -inf (a masked class) adds 0 (0 log 0), not NaN: to KL's teacher entropy (TENT) and to
    the JSD."""
    p64, p32, kw = _problem("segments", "dense", 91)
    mask = torch.rand(p32["teacher_logits"].shape, generator=torch.Generator().manual_seed(4)) < 0.3
    mask[:, 0] = mask[:, 17] = mask[:, 230] = False  # every segment keeps a class
    for p in (p32, p64):
        p["teacher_logits"] = p["teacher_logits"].masked_fill(mask, -math.inf)
    ref = reference.linear_soft_target_loss(**p64, mode=mode, **kw)
    out = kc_kernels.linear_soft_target_loss(**p32, mode=mode, backend="triton", **kw)
    assert torch.isfinite(out)
    _compare(out, ref, [p32[k] for k in LINEAR], [p64[k] for k in LINEAR], LINEAR)


# ------------------------------------------------------------------------------------------------------- options

OPTIONS = {  # softcap (0: off), z_loss, uniform_target
    "softcap": (3.0, 0.0, 0.0),
    "z_loss": (0.0, 0.05, 0.0),
    "uniform": (0.0, 0.0, 2e-3),
    "all": (2.5, 0.05, 2e-3),
}


def _segment_lse(y, bounds):
    return torch.stack([torch.logsumexp(y[:, lo:hi], dim=1) for lo, hi in zip(bounds[:-1], bounds[1:])], dim=1)


def _options_case(mode, target, option, case, linear):
    B, H, V, bounds, T, _, _, budget = CASES[case]
    softcap, z_loss, uniform = OPTIONS[option]
    p64, p32, _ = _problem(case, "dense" if target == "dense" else "topk", 7000 + len(option) + 31 * len(case))
    reduction = "sum" if linear else "mean"
    if linear:
        inputs32, inputs64, names = [p32[k] for k in LINEAR], [p64[k] for k in LINEAR], LINEAR
    else:
        lg64, lg32 = _logits_pair(p32)
        inputs32, inputs64, names = [lg32], [lg64], ("logits",)
    args = [*(inputs32 if linear else [inputs32[0], None, None]), None, p32.get("target_index"),
            p32.get("target_value"), p32.get("teacher_logits"), None, None, None, None, p32.get("segments"), [],
            mode, reduction, T, [0.5, softcap, z_loss, uniform], "triton", budget or 0, 7 if linear else 1]
    out = chunked_soft_target(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    tk = {k: p64[k] for k in ("teacher_logits", "target_index", "target_value", "segments") if k in p64}
    opts = dict(softcap=softcap or None, z_loss=z_loss, uniform_target=uniform)
    if linear:
        ref = reference.linear_soft_target_loss(*inputs64, mode=mode, temperature=T, reduction=reduction, **tk, **opts)
        u = reference.linear_logits(*[t.detach() for t in inputs64])
    else:
        ref = reference.soft_target_loss(inputs64[0], mode=mode, temperature=T, reduction=reduction, **tk, **opts)
        u = inputs64[0].detach()
    assert_close(out[0], ref, F32, "loss")
    for name, a, e in zip(names, out[2:], torch.autograd.grad(ref, inputs64)):
        assert_close(a, e, F32, f"d{name}")
    y = (softcap * torch.tanh(u / softcap) if softcap else u) / T
    assert_close(out[1], _segment_lse(y, bounds or [0, V]), F32, "lse")


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("target", ["sparse", "dense"])
@pytest.mark.parametrize("mode", ["softmax", "kl"])
def test_options_linear(mode, target, option):
    if mode == "kl" and OPTIONS[option][2]:  # refused: kl's sum z log z over smoothed targets needs every class
        with pytest.raises(ValueError, match="^uniform_target: "):
            _options_case(mode, target, option, "segments", linear=True)
        return
    _options_case(mode, target, option, "segments", linear=True)


@pytest.mark.parametrize("target", ["sparse", "dense"])
@pytest.mark.parametrize("linear", [True, False], ids=["row_blocks", "logits_per_phase"])
def test_options_long_segment(linear, target):
    """A segment longer than a chunk: the soft-capped logits are made again in every call (row blocks, or one walk
    per phase of given logits)."""
    _options_case("softmax", target, "all", "long_segment", linear=linear)


def test_options_of_linear_cross_entropy():
    """The public front of the options: hard labels with label smoothing, z-loss and soft-capping, one segment
    longer than a chunk."""
    g = torch.Generator().manual_seed(11)
    x32, x64 = _f32(torch.randn(9, 16, generator=g) * 2)
    w32, w64 = _f32(torch.randn(600, 16, generator=g) / 2)
    lab = torch.randint(0, 600, (9,), generator=g)
    lab[3] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    for t in (x32, w32, x64, w64):
        t.requires_grad_()
    out = kc_kernels.linear_cross_entropy(x32, w32, labels=lab, backend="triton", memory_budget=1, **kw)
    ref = reference.cross_entropy_loss(x64 @ w64.t(), lab, **kw)
    _compare(out, ref, [x32, w32], [x64, w64], ("x", "weight"))


@pytest.mark.parametrize("mode,options", [("jsd", [0.5, 3.0, 0.0, 0.0]), ("reverse_kl", [0.5, 0.0, 0.1, 0.0]),
                                          ("sigmoid", [0.5, 0.0, 0.0, 1e-3])])
def test_options_of_other_modes_are_refused(mode, options):
    p64, p32, _ = _problem("segments", "dense", 5)
    args = [p32["x"].detach(), p32["weight"].detach(), None, None, None, None, p32["teacher_logits"], None, None,
            None, None, p32["segments"], [], mode, "sum", 1.0, options, "triton", 0, 0]
    with pytest.raises(ValueError, match="softcap|z_loss|uniform_target"):
        chunked_soft_target(*args)
