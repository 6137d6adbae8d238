"""The cpu backend's divergence modes (kl, reverse_kl, jsd) and the options of softmax/kl (softcap, z-loss, a uniform
target) against the float64 definition (kc_kernels.reference): the reference runs on float64 copies of the float32
inputs the backend gets; the loss and every gradient (x, weight, bias; logits) are compared.

Layouts: one segment; several; a segment longer than a chunk (memory_budget=1 gives chunks of MIN_CHUNK classes:
the linear op walks it in row blocks, B=70 making three of them, given logits in one walk per phase); B=1.
Teachers: dense logits, a teacher head (teacher_x, teacher_weight, teacher_bias) and sparse top-K probabilities
(filled in as a dense teacher under reverse_kl/jsd, taken as sparse targets under kl).
The options are not arguments of the public ops (linear_cross_entropy uses them), so they are tested through the
custom op kc_kernels::chunked_soft_target, which takes them as [beta, softcap, z_loss, uniform_target].
"""
import math

import pytest
import torch

import kc_kernels
from kc_kernels import _C, reference
from kc_kernels.chunked import chunked_soft_target
from kc_kernels.layout import MIN_CHUNK, plan_chunks
from tests.helpers import assert_close, grads, rel_err

F32 = torch.float32
MODES = ("kl", "reverse_kl", "jsd")

# B, H, V, segment bounds (None: one segment), temperature, beta, reduction, memory_budget
CASES = {
    "one_segment": (6, 12, 301, None, 1.0, 0.5, "mean", None),
    "segments": (5, 10, 523, [0, 17, 230, 523], 2.0, 0.3, "sum", None),
    "long_segment": (70, 8, 700, [0, 60, 650, 700], 2.0, 0.8, "mean", 1),
    "single_row": (1, 9, 400, [0, 150, 400], 1.0, 0.8, "none", None),
}


def _f32(t):
    """A float32 tensor and the float64 tensor of the same values."""
    t = t.float()
    return t, t.double()


def _problem(case, teacher, seed):
    """(float64 kwargs for the reference, float32 kwargs for the backend), x/weight/bias requiring gradients."""
    B, H, V, bounds, T, beta, reduction, _ = CASES[case]
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
        for k in ("x", "weight", "bias"):
            p[k] = p[k].clone().requires_grad_()
    return p64, p32, dict(temperature=T, beta=beta, reduction=reduction)


def _is_multi_chunk(case):
    B, H, V, bounds, *_ = CASES[case]
    return any(len(step) > 1 for step in plan_chunks(bounds or [0, V], MIN_CHUNK, False))


def _compare(out, ref, tensors32, tensors64, names):
    assert_close(out, ref, F32, "loss")
    for name, a, e in zip(names, grads(out, tensors32), grads(ref, tensors64)):
        assert_close(a, e, F32, f"d{name}")


def test_the_long_case_walks_a_segment_in_chunks():
    assert _is_multi_chunk("long_segment")  # at memory_budget=1, chunks of MIN_CHUNK classes


@pytest.mark.parametrize("teacher", ["dense", "head", "topk"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_linear_matches_reference(mode, case, teacher):
    seed = 100 + 10 * MODES.index(mode) + list(CASES).index(case) + 1000 * ("dense", "head", "topk").index(teacher)
    p64, p32, kw = _problem(case, teacher, seed)
    ref = reference.linear_soft_target_loss(**p64, mode=mode, **kw)
    out = kc_kernels.linear_soft_target_loss(**p32, mode=mode, backend="cpu", memory_budget=CASES[case][-1], **kw)
    names = ("x", "weight", "bias")
    _compare(out, ref, [p32[k] for k in names], [p64[k] for k in names], names)


def _logits_pair(p64, p32):
    """The problem's logits x W^T + bias as the input of soft_target_loss (float32, and its float64 copy)."""
    with torch.no_grad():
        lg32 = torch.addmm(p32["bias"], p32["x"], p32["weight"].t())
    lg64 = lg32.double().requires_grad_()
    return lg64, lg32.requires_grad_()


@pytest.mark.parametrize("teacher", ["dense", "topk"])
@pytest.mark.parametrize("case", ["one_segment", "long_segment", "single_row"])
@pytest.mark.parametrize("mode", MODES)
def test_logits_match_reference(mode, case, teacher):
    """soft_target_loss on given logits: a segment longer than a chunk is walked once per phase (TEACHER, STATS,
    MIX, FINAL), each call reading its chunk of the logits again."""
    p64, p32, kw = _problem(case, teacher, 5000 + 10 * MODES.index(mode) + list(CASES).index(case))
    lg64, lg32 = _logits_pair(p64, p32)
    tk = ("teacher_logits", "target_index", "target_value", "segments")
    ref = reference.soft_target_loss(lg64, **{k: p64[k] for k in tk if k in p64}, mode=mode, **kw)
    out = kc_kernels.soft_target_loss(lg32, **{k: p32[k] for k in tk if k in p32}, mode=mode, backend="cpu",
                                      memory_budget=CASES[case][-1], **kw)
    _compare(out, ref, [lg32], [lg64], ("logits",))


@pytest.mark.parametrize("mode", MODES)
def test_sample_weight_and_jsd_beta_limits(mode):
    """Sample weights; jsd with beta 0 and 1 is kl and reverse_kl (the front maps them)."""
    p64, p32, kw = _problem("segments", "dense", 77 + MODES.index(mode))
    sw = torch.rand(CASES["segments"][0], generator=torch.Generator().manual_seed(3)) + 0.5
    for beta in ((0.0, 1.0) if mode == "jsd" else (0.5,)):
        kw["beta"] = beta
        ref = reference.linear_soft_target_loss(**p64, mode=mode, sample_weight=sw.double(), **kw)
        out = kc_kernels.linear_soft_target_loss(**p32, mode=mode, sample_weight=sw, backend="cpu", **kw)
        names = ("x", "weight", "bias")
        _compare(out, ref, [p32[k] for k in names], [p64[k] for k in names], names)


def test_jsd_with_masked_teacher_classes():
    """A teacher logit of -inf (a masked class) adds 0 to the JSD (0 log 0), not NaN."""
    p64, p32, kw = _problem("segments", "dense", 91)
    mask = torch.rand(p32["teacher_logits"].shape, generator=torch.Generator().manual_seed(4)) < 0.3
    mask[:, 0] = False  # every segment keeps a class
    mask[:, 17] = mask[:, 230] = False
    for p in (p32, p64):
        p["teacher_logits"] = p["teacher_logits"].masked_fill(mask, -math.inf)
    ref = reference.linear_soft_target_loss(**p64, mode="jsd", **kw)
    out = kc_kernels.linear_soft_target_loss(**p32, mode="jsd", backend="cpu", **kw)
    assert torch.isfinite(out)
    names = ("x", "weight", "bias")
    _compare(out, ref, [p32[k] for k in names], [p64[k] for k in names], names)


# ------------------------------------------------------------------------------------------------------- options

OPTIONS = {  # softcap (0: off), z_loss, uniform_target
    "softcap": (3.0, 0.0, 0.0),
    "z_loss": (0.0, 0.05, 0.0),
    "uniform": (0.0, 0.0, 2e-3),
    "all": (2.5, 0.05, 2e-3),
}


def _segment_lse(y, bounds):
    return torch.stack([torch.logsumexp(y[:, lo:hi], dim=1) for lo, hi in zip(bounds[:-1], bounds[1:])], dim=1)


def _options_case(mode, target, option, case, linear, check_loss=True):
    B, H, V, bounds, T, _, _, budget = CASES[case]
    softcap, z_loss, uniform = OPTIONS[option]
    p64, p32, _ = _problem(case, "dense" if target == "dense" else "topk", 7000 + len(option) + 31 * len(case))
    reduction = "sum" if linear else "mean"
    if linear:
        names = ("x", "weight", "bias")
        inputs32, inputs64 = [p32[k] for k in names], [p64[k] for k in names]
    else:
        lg64, lg32 = _logits_pair(p64, p32)
        inputs32, inputs64, names = [lg32], [lg64], ("logits",)
    seg = p32.get("segments")
    args = [*(inputs32 if linear else [inputs32[0], None, None]), None, p32.get("target_index"),
            p32.get("target_value"), p32.get("teacher_logits"), None, None, None, None, seg, [], mode, reduction, T,
            [0.5, softcap, z_loss, uniform], "cpu", budget or 0, 7 if linear else 1]
    out = chunked_soft_target(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    tk = {k: p64[k] for k in ("teacher_logits", "target_index", "target_value", "segments") if k in p64}
    opts = dict(softcap=softcap or None, z_loss=z_loss, uniform_target=uniform)
    if linear:
        ref = reference.linear_soft_target_loss(*inputs64, mode=mode, temperature=T, reduction=reduction, **tk, **opts)
        u = reference.linear_logits(*[t.detach() for t in inputs64])
    else:
        ref = reference.soft_target_loss(inputs64[0], mode=mode, temperature=T, reduction=reduction, **tk, **opts)
        u = inputs64[0].detach()
    if check_loss:
        assert_close(out[0], ref, F32, "loss")
    for name, a, e in zip(names, out[2:], torch.autograd.grad(ref, inputs64)):
        assert_close(a, e, F32, f"d{name}")
    y = (softcap * torch.tanh(u / softcap) if softcap else u) / T
    assert_close(out[1], _segment_lse(y, bounds or [0, V]), F32, "lse")


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("target", ["sparse", "dense"])
@pytest.mark.parametrize("mode", ["softmax", "kl"])
@pytest.mark.parametrize("case", ["segments", "long_segment"])
def test_options_linear(case, mode, target, option):
    if mode == "kl" and OPTIONS[option][2]:  # refused: kl's sum z log z over smoothed targets needs every class
        with pytest.raises(ValueError, match="^uniform_target: "):
            _options_case(mode, target, option, case, linear=True)
        return
    _options_case(mode, target, option, case, linear=True)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("target", ["sparse", "dense"])
def test_options_logits_walked_per_phase(target, option):
    """Given logits and a segment longer than a chunk: the soft-cap is folded again in every call."""
    _options_case("softmax", target, option, "long_segment", linear=False)


def test_options_of_linear_cross_entropy():
    """The public front of the options: hard labels with label smoothing, z-loss and soft-capping."""
    g = torch.Generator().manual_seed(11)
    x32, x64 = _f32(torch.randn(9, 16, generator=g) * 2)
    w32, w64 = _f32(torch.randn(800, 16, generator=g) / 2)
    lab = torch.randint(0, 800, (9,), generator=g)
    lab[3] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    x32.requires_grad_(), w32.requires_grad_(), x64.requires_grad_(), w64.requires_grad_()
    out = kc_kernels.linear_cross_entropy(x32, w32, labels=lab, backend="cpu", memory_budget=1, **kw)
    ref = reference.cross_entropy_loss(x64 @ w64.t(), lab, **kw)
    _compare(out, ref, [x32, w32], [x64, w64], ("x", "weight"))


# -------------------------------------------------------------------------------------------------------- bf16

U = 2.0 ** -9  # bf16's unit roundoff; the bounds are tests/test_cpu_bf16.py's (its docstring derives them)


@pytest.mark.parametrize("mode,teacher", [("kl", "dense"), ("reverse_kl", "topk"), ("jsd", "dense")])
def test_bf16_path(mode, teacher, monkeypatch):
    """bf16 x/weight/bias on the bf16 path (bf16 scores, fp32 math): the float64 reference on the same bf16 values;
    a segment longer than a chunk, walked in row blocks."""
    monkeypatch.setenv("KC_CPU_BF16", "1")
    p64, p32, kw = _problem("long_segment", teacher, 9000 + MODES.index(mode))
    names = ("x", "weight", "bias")
    lo = {k: p32[k].detach().to(torch.bfloat16).requires_grad_() for k in names}
    ref_in = {k: lo[k].detach().double().requires_grad_() for k in names}
    rest64 = {k: v for k, v in p64.items() if k not in names}
    rest32 = {k: v for k, v in p32.items() if k not in names}
    ref = reference.linear_soft_target_loss(**ref_in, **rest64, mode=mode, **kw)
    out = kc_kernels.linear_soft_target_loss(**lo, **rest32, mode=mode, backend="cpu", memory_budget=2 * 70 * 256,
                                             **kw)
    r, o = ref.detach().double(), out.detach().double()
    assert torch.allclose(o, r, rtol=4 * U, atol=4 * U * r.abs().max().item()), rel_err(o, r)
    for name, a, e in zip(names, grads(out, [lo[k] for k in names]), grads(ref, [ref_in[k] for k in names])):
        assert a.dtype == torch.bfloat16
        err = rel_err(a, e)
        assert err <= 6 * U, f"d{name}: norm-wise relative error {err:.2e}"


# ---------------------------------------------------------------------------------------- the kernel's own checks

def _params(mode, **fields):
    B, N = 2, 8
    keep = [torch.zeros(B, N), torch.tensor([0, N]), torch.tensor([0]),
            torch.zeros(_C.NUM_STATES, B, 1, dtype=torch.float64), torch.zeros(B, dtype=torch.float64),
            torch.zeros(B, N)]
    a = _C.SoftTargetChunkParams()
    a.u, a.ld, a.rows, a.ncols, a.npieces = keep[0].data_ptr(), N, B, N, 1
    a.piece_lo, a.piece_seg, a.num_segments = keep[1].data_ptr(), keep[2].data_ptr(), 1
    a.state, a.softplus_sum = keep[3].data_ptr(), keep[4].data_ptr()
    a.phases, a.mode, a.inv_t, a.t2 = _C.PHASES["STATS"], _C.LOSS_MODES[mode], 1.0, 1.0
    a.teacher, a.teacher_ld, a.beta = keep[5].data_ptr(), N, 0.5
    for k, v in fields.items():
        setattr(a, k, v)
    return a, keep


@pytest.mark.parametrize("mode,fields,match", [
    ("JSD", dict(beta=1.0), "beta"),
    ("JSD", dict(beta=0.0), "beta"),
    ("REVERSE_KL", dict(teacher=0), "teacher"),
    ("JSD", dict(scale_kind=1), "scale_kind"),
    ("SIGMOID", dict(softcap=2.0), "softcap"),
    ("JSD", dict(z_loss=0.1), "z_loss"),
    ("SOFTMAX", dict(uniform_target=-1.0), "uniform_target"),
    ("SOFTMAX", dict(softcap=float("nan")), "softcap"),
    ("KL", dict(z_loss=0.1, scale_kind=1), "scale"),
])
def test_kernel_refuses_bad_fields(mode, fields, match):
    if fields.get("scale_kind"):
        fields["scale"] = torch.ones(1).data_ptr()
    a, keep = _params(mode, **fields)
    with pytest.raises(ValueError, match=match):
        _C.soft_target_chunk(a)


def test_kernel_refuses_an_unknown_mode():
    a, keep = _params("SOFTMAX")
    a.mode = len(_C.LOSS_MODES)
    with pytest.raises(ValueError, match="mode"):
        _C.soft_target_chunk(a)


def test_teacher_phase_accumulates_the_teacher_entropy():
    """TENT / TSUMEXP - tlse = sum z log z per segment, whatever the chunks (one call or three)."""
    g = torch.Generator().manual_seed(5)
    B, N = 3, 700
    t = torch.randn(B, N, generator=g) * 3 + 20  # far from 0: a sum of e t/T would cancel against the max
    z = torch.softmax(t.double() / 2, dim=1)
    want = (z * torch.log(z)).sum(dim=1)
    for cuts in ([0, N], [0, 100, 450, N]):
        state = torch.zeros(_C.NUM_STATES, B, 1, dtype=torch.float64)
        state[_C.STATES["TMAX"]] = -math.inf
        sp = torch.zeros(B, dtype=torch.float64)
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            tc = t[:, lo:hi].contiguous()
            plo, pseg = torch.tensor([0, hi - lo]), torch.tensor([0])
            a = _C.SoftTargetChunkParams()
            a.rows, a.ncols, a.col0, a.npieces, a.num_segments = B, hi - lo, lo, 1, 1
            a.piece_lo, a.piece_seg, a.state, a.softplus_sum = plo.data_ptr(), pseg.data_ptr(), state.data_ptr(), \
                sp.data_ptr()
            a.phases, a.mode, a.inv_t, a.t2 = _C.PHASES["TEACHER"], _C.LOSS_MODES["SOFTMAX"], 0.5, 4.0
            a.teacher, a.teacher_ld = tc.data_ptr(), hi - lo
            _C.soft_target_chunk(a)
        st = state[:, :, 0]
        tlse = st[_C.STATES["TMAX"]] + torch.log(st[_C.STATES["TSUMEXP"]])
        got = st[_C.STATES["TENT"]] / st[_C.STATES["TSUMEXP"]] - tlse
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got, want)
