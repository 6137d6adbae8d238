"""The GPU backends (triton, cuda) of the soft-target losses against the float64 reference: loss and every
gradient, through the chunked driver.

On a machine without CUDA the triton epilogue runs under TRITON_INTERPRET=1 (set by conftest) on CPU tensors, with
torch's CPU GEMMs; the epilogue kernels have no tl.dot, so fp16 and bf16 are checked here too. Small memory
budgets make these small shapes cross chunk, segment and row-block edges. The cuda backend runs only on a GPU.
"""
import math

import pytest
import torch

import kc_kernels
from tests.conftest import HAS_CUDA
from tests.helpers import assert_close, grads, make_problem

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = [b for b in ("triton", "cuda") if kc_kernels.backends()[b] and (HAS_CUDA or b == "triton")]
if not BACKENDS:
    pytest.skip("no GPU backend can run here", allow_module_level=True)
# several chunks at these small shapes: a budget of about 64 columns of 20 rows
SMALL_BUDGET = 64 * 20 * 4


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param
FLOAT_ARGS = ("x", "weight", "bias", "scale", "teacher_logits", "target_value", "sample_weight")
GRAD_ARGS = ("x", "weight", "bias", "scale")


def _cast(prob, dtype, requires_grad=GRAD_ARGS):
    out = {}
    for k, v in prob.items():
        if isinstance(v, torch.Tensor) and k in FLOAT_ARGS:
            v = v.to(dtype)
            if k in requires_grad:
                v = v.detach().requires_grad_()
        out[k] = v
    return out


def _linear(prob, backend, **kw):
    a = dict(prob)
    return kc_kernels.linear_soft_target_loss(a.pop("x"), a.pop("weight"), a.pop("bias"), backend=backend, **a, **kw)


def _check_linear(prob, dtype, backend, requires_grad=GRAD_ARGS, memory_budget=None, **kw):
    """``backend`` in ``dtype`` vs the reference in float64 on the same (dtype-rounded) inputs."""
    low = _cast(prob, dtype, requires_grad)
    high = _cast({k: (v.to(dtype) if k in FLOAT_ARGS and isinstance(v, torch.Tensor) else v)
                  for k, v in prob.items()}, torch.float64, requires_grad)
    loss = _linear(low, backend, memory_budget=memory_budget, **kw)
    ref = _linear(high, "reference", **kw)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert_close(loss, ref, dtype, "loss")
    names = [n for n in GRAD_ARGS if low.get(n) is not None and n in requires_grad]
    if not names:
        return
    got = grads(loss, [low[n] for n in names])
    want = grads(ref, [high[n] for n in names])
    for n, g, w in zip(names, got, want):
        if w is None:
            assert g is None, n
            continue
        assert g.dtype == low[n].dtype, n
        assert_close(g, w, dtype, f"d{n}")


def _problem(B=20, H=24, V=100, device=DEVICE, seed=1, **kw):
    # seed 1 cuts V=100 into three segments of 23, 52 and 25 classes. (Seed 0 leaves a one-class segment, where the
    # gradient under a scale is the difference of two terms of size gamma q / (n T) that cancel to about eps / n^2
    # of them: a 1-ulp fp32 error there exceeds the test's tolerance for any implementation.)
    return make_problem(B, H, V, device=device, gen=torch.Generator().manual_seed(seed), **kw)


# every mode x target form x scale kind x reduction, with three segments and a non-unit temperature
FULL = [(mode, form, scale, red) for mode in ("sigmoid", "softmax") for form in ("sparse", "dense")
        for scale in (None, "segment", "class") for red in ("none", "sum", "mean")]


@pytest.mark.parametrize("mode,form,scale,reduction", FULL)
def test_linear_every_mode_fp32(mode, form, scale, reduction, backend):
    prob = _problem(G=3, K=4, target_form=form, scale_kind=scale, sample_weight=reduction != "mean")
    _check_linear(prob, torch.float32, backend, mode=mode, reduction=reduction, temperature=1.5 if scale else 1.0,
                  memory_budget=SMALL_BUDGET if reduction == "sum" else None)


# odd shapes and arguments: V not a multiple of the tile, B=1, segments of one class, grouped x, no bias, large
# logits, temperature, long K with padding
ODD = [
    dict(B=7, V=37, K=5),                                          # V below one chunk, not a tile multiple
    dict(B=1, V=131, G=4, scale_kind="segment", K=2),              # one row; segments cross chunk edges
    dict(B=9, V=6, G=6, scale_kind="segment", K=3),                # every segment a single class
    dict(B=9, V=6, G=6, target_form="dense"),
    dict(B=18, V=90, G=3, grouped=True, K=6),                      # grouped x: one hidden vector per segment
    dict(B=18, V=90, G=3, grouped=True, scale_kind="class", target_form="dense"),
    dict(B=18, V=90, G=3, grouped=True, scale_kind="segment", sample_weight=True),
    dict(B=17, V=70, bias=False, K=8),
    dict(B=17, V=70, G=2, logit_scale=25.0, K=3),                  # logits in the hundreds: overflow-safe?
    dict(B=17, V=70, G=2, logit_scale=25.0, target_form="dense", scale_kind="segment"),
    dict(B=33, H=40, V=150, G=5, K=12, scale_kind="class"),        # three row blocks, H not a block multiple
    dict(B=6, V=37, G=2, K=40, scale_kind="segment"),              # more targets than classes: many per tile
    dict(B=5, V=40, K=0),                                          # no targets at all
    dict(B=10, V=300, G=2, K=8, scale_kind="segment", budget=True),  # segments longer than a chunk: row blocks
    dict(B=10, V=300, target_form="dense", scale_kind="class", budget=True),
]


@pytest.mark.parametrize("case", ODD, ids=[str(i) for i in range(len(ODD))])
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_linear_odd_cases_fp32(case, mode, backend):
    case = dict(case)
    args = {k: case.pop(k) for k in ("B", "H", "V") if k in case}
    budget = 4 * 10 * 64 if case.pop("budget", False) else None
    prob = _problem(**args, **case)
    _check_linear(prob, torch.float32, backend, mode=mode, reduction="none" if case.get("sample_weight") else "mean",
                  temperature=2.0 if case.get("target_form") == "dense" else 1.0, memory_budget=budget)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_duplicate_indices_and_padding_add_up(mode, backend):
    prob = _problem(B=12, V=50, G=2, K=6, scale_kind="segment")
    idx = prob["target_index"].clone()
    idx[:, 1] = idx[:, 0]  # duplicates, also duplicates of padding
    idx[:, 2] = 3
    idx[:, 3] = 3
    idx[::2, 5] = -1
    prob["target_index"] = idx
    _check_linear(prob, torch.float32, backend, mode=mode)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_teacher_logits_with_minus_inf(mode, backend):
    prob = _problem(B=10, V=60, G=3, target_form="dense", scale_kind="segment")
    t = prob["teacher_logits"].clone()
    t[:, ::3] = -math.inf  # masked teacher classes: target 0, never NaN
    prob["teacher_logits"] = t
    _check_linear(prob, torch.float32, backend, mode=mode, temperature=2.0)


@pytest.mark.parametrize("requires_grad", [("x",), ("weight", "bias"), ("scale",), ()])
def test_only_requested_gradients(requires_grad, backend):
    prob = _problem(B=10, V=40, G=2, scale_kind="segment")
    _check_linear(prob, torch.float32, backend, requires_grad=requires_grad, mode="softmax")


HALF = [
    ("sigmoid", dict(G=3, K=4)),
    ("softmax", dict(G=3, K=4, scale_kind="segment")),
    ("sigmoid", dict(G=3, target_form="dense", scale_kind="class")),
    ("softmax", dict(G=3, target_form="dense", grouped=True)),
    ("softmax", dict(V=37, B=5, K=3, sample_weight=True)),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode,case", HALF, ids=[f"{m}-{i}" for i, (m, _) in enumerate(HALF)])
def test_linear_half(mode, case, dtype, backend):
    prob = _problem(**case)
    _check_linear(prob, dtype, backend, mode=mode, reduction="sum" if case.get("sample_weight") else "mean")


# ---------------------------------------------------------------------------------------- soft_target_loss

def _check_logits(prob, dtype, backend, **kw):
    logits = kc_kernels.reference.linear_logits(prob["x"], prob["weight"], prob["bias"], prob.get("segments"))
    rest = {k: v for k, v in prob.items() if k not in ("x", "weight", "bias")}
    low = _cast({"logits": logits, **rest}, dtype, ("logits", "scale"))
    low["logits"] = logits.to(dtype).detach().requires_grad_()
    high = _cast({k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in low.items()}, torch.float64, ("scale",))
    high["logits"] = low["logits"].detach().double().requires_grad_()
    a, b = dict(low), dict(high)
    loss = kc_kernels.soft_target_loss(a.pop("logits"), backend=backend, **a, **kw)
    ref = kc_kernels.soft_target_loss(b.pop("logits"), backend="reference", **b, **kw)
    assert_close(loss, ref, dtype, "loss")
    names = ["logits"] + (["scale"] if low.get("scale") is not None else [])
    for n, g, w in zip(names, grads(loss, [low[n] for n in names]), grads(ref, [high[n] for n in names])):
        assert g.dtype == low[n].dtype
        assert_close(g, w, dtype, f"d{n}")


LOGITS = [(mode, form, scale) for mode in ("sigmoid", "softmax") for form in ("sparse", "dense")
          for scale in (None, "segment", "class")]


@pytest.mark.parametrize("mode,form,scale", LOGITS)
def test_soft_target_loss_fp32(mode, form, scale, backend):
    prob = _problem(B=19, V=77, G=3, K=5, target_form=form, scale_kind=scale, sample_weight=True)
    # a budget below one segment: given logits are walked once per phase
    _check_logits(prob, torch.float32, backend, mode=mode, reduction="none", temperature=1.5,
                  memory_budget=19 * 4 * 256 if scale == "class" else None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_soft_target_loss_half(mode, dtype, backend):
    prob = _problem(B=9, V=50, G=2, K=3, scale_kind="segment")
    _check_logits(prob, dtype, backend, mode=mode)


# ----------------------------------------------------------------------------------------------- behaviour

def test_float64_is_rejected_with_a_named_argument(backend):
    prob = _problem(B=3, V=10)
    with pytest.raises(ValueError, match="x: .*float64"):
        _linear(prob, backend)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_loss_and_gradients_are_bitwise_identical_across_calls(mode, backend):
    prob = _cast(_problem(B=20, V=300, G=3, K=5, scale_kind="segment"), torch.float32)
    outs = []
    for _ in range(2):
        loss = _linear(prob, backend, mode=mode, memory_budget=4 * 20 * 64)
        outs.append([loss] + grads(loss, [prob[k] for k in GRAD_ARGS]))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
@pytest.mark.parametrize("case", [dict(G=3, K=4, scale_kind="segment"),
                                  dict(G=3, target_form="dense", grouped=True, scale_kind="class")])
def test_linear_bf16_gpu(mode, case, backend):
    prob = _problem(B=300, H=256, V=2000, **case)
    _check_linear(prob, torch.bfloat16, backend, mode=mode)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_linear_gpu_realistic_shape(dtype, backend):
    prob = _problem(B=512, H=512, V=20_000, G=7, K=100, scale_kind="segment")
    _check_linear(prob, dtype, backend, mode="sigmoid")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_auto_picks_triton_for_cuda_tensors():
    from kc_kernels.dispatch import resolve

    assert resolve("linear_soft_target_loss", "auto", torch.device("cuda"))[0] == "triton"


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("given_logits", [False, True])
def test_int64_offsets_past_2_pow_31_gpu(given_logits, backend):
    """B * V > 2^31 elements of teacher logits (and of given logits): the last rows, which sit past 2^31, against the
    reference of those rows alone (rows are independent)."""
    B, H, V = 22_000, 16, 100_000
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, H, generator=g, device="cuda").half()
    w = (torch.randn(V, H, generator=g, device="cuda") / 4).half()
    teacher = torch.randn(B, V, generator=g, device="cuda", dtype=torch.float16)
    kw = dict(mode="softmax", reduction="none")
    if given_logits:
        inp = (x @ w.t()).requires_grad_()
        loss = kc_kernels.soft_target_loss(inp, teacher_logits=teacher, backend=backend, **kw)
        tail = inp[-8:].detach().double().requires_grad_()
        ref = kc_kernels.soft_target_loss(tail, teacher_logits=teacher[-8:].double(), backend="reference", **kw)
    else:
        inp = x.requires_grad_()
        loss = kc_kernels.linear_soft_target_loss(inp, w, teacher_logits=teacher, backend=backend, **kw)
        tail = inp[-8:].detach().double().requires_grad_()
        ref = kc_kernels.linear_soft_target_loss(tail, w.double(), teacher_logits=teacher[-8:].double(),
                                                 backend="reference", **kw)
    (d,) = torch.autograd.grad(loss[-8:].sum(), [inp])
    (dref,) = torch.autograd.grad(ref.sum(), [tail])
    assert_close(loss[-8:], ref, torch.float16, "loss")
    assert_close(d[-8:], dref, torch.float16, "gradient")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("form", ["sparse", "dense"])
def test_no_host_synchronisation_in_a_training_step(form, backend, monkeypatch):
    """With the data-reading checks off (their default on a GPU), forward + backward never waits for the device:
    a second step, after the segment layout and chunk tables are cached, runs under sync debug mode "error"."""
    monkeypatch.delenv("KC_CHECK_VALUES", raising=False)
    prob = _cast(_problem(B=64, H=32, V=3000, G=5, K=8, target_form=form, scale_kind="segment"), torch.bfloat16)
    for step in range(2):
        if step == 1:
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss = _linear(prob, backend, mode="softmax")
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------ the divergence modes and the options
#
# kl, reverse_kl and jsd (dense teacher, teacher head, top-K probabilities) and softmax/kl's softcap, z-loss and
# uniform target against the float64 reference, on a GPU: the reference on float64 copies of the float32 inputs the
# backend gets; the loss and every gradient. memory_budget=1 gives chunks of MIN_CHUNK classes, so the segment of
# 590 classes is walked in chunks (the linear op in row blocks, two of them at B=40; given logits once per phase:
# TEACHER, STATS, MIX, FINAL). (Under the interpreter these cases are tests/test_triton_divergences.py's.)

DIV_MODES = ("kl", "reverse_kl", "jsd")
DIV_TEACHERS = ("dense", "head", "topk")
DIV_LINEAR = ("x", "weight", "bias")
# B, H, V, segment bounds (None: one segment), temperature, beta, reduction, memory_budget
DIV_CASES = {
    "one_segment": (6, 12, 301, None, 1.0, 0.5, "mean", None),
    "segments": (5, 10, 523, [0, 17, 230, 523], 2.0, 0.3, "sum", None),
    "long_segment": (6, 8, 700, [0, 60, 650, 700], 2.0, 0.7, "mean", 1),
    "row_blocks": (40, 8, 700, [0, 60, 650, 700], 2.0, 0.3, "mean", 1),
    "single_row": (1, 9, 400, [0, 150, 400], 1.0, 0.7, "none", None),
}


def _div_problem(case, teacher, seed, device=DEVICE):
    """(float64 kwargs for the reference, float32 kwargs for the backend, shared kwargs) on ``device``;
    x/weight/bias require gradients."""
    B, H, V, bounds, T, beta, reduction, _ = DIV_CASES[case]
    g = torch.Generator().manual_seed(seed)
    raw = {"x": torch.randn(B, H, generator=g) * 1.5, "weight": torch.randn(V, H, generator=g) * (2 / math.sqrt(H)),
           "bias": torch.randn(V, generator=g) * 0.5}
    if teacher == "dense":
        raw["teacher_logits"] = torch.randn(B, V, generator=g) * 2
    elif teacher == "head":
        Ht = H + 3
        raw.update(teacher_x=torch.randn(B, Ht, generator=g),
                   teacher_weight=torch.randn(V, Ht, generator=g) * (2 / math.sqrt(Ht)),
                   teacher_bias=torch.randn(V, generator=g) * 0.5)
    else:  # top-K probabilities (-1 padding; duplicates add up), at most 0.9 of each row's mass
        raw["target_index"] = torch.randint(-1, V, (B, 6), generator=g)
        raw["target_value"] = torch.rand(B, 6, generator=g) * 0.15
    p32, p64 = {}, {}
    for k, t in raw.items():
        if t.is_floating_point():
            p32[k] = t.float().to(device)
            p64[k] = p32[k].double()
        else:
            p32[k] = p64[k] = t.to(device)
    for p in (p32, p64):
        if bounds is not None:
            p["segments"] = torch.tensor(bounds, device=device)
        for k in DIV_LINEAR:
            p[k] = p[k].clone().requires_grad_()
    return p64, p32, dict(temperature=T, beta=beta, reduction=reduction)


def _div_compare(out, ref, tensors32, tensors64, names):
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert_close(out, ref, torch.float32, "loss")
    for name, a, e in zip(names, grads(out, tensors32), grads(ref, tensors64)):
        assert a.dtype == torch.float32, name
        assert_close(a, e, torch.float32, f"d{name}")


def _div_logits(p32):
    """The problem's logits x W^T + bias as the input of soft_target_loss (float32, and its float64 copy)."""
    with torch.no_grad():
        lg32 = torch.addmm(p32["bias"], p32["x"], p32["weight"].t())
    return lg32.double().requires_grad_(), lg32.requires_grad_()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("teacher", DIV_TEACHERS)
@pytest.mark.parametrize("case", list(DIV_CASES))
@pytest.mark.parametrize("mode", DIV_MODES)
def test_divergence_linear_gpu(mode, case, teacher, backend):
    p64, p32, kw = _div_problem(case, teacher, 100 + 10 * DIV_MODES.index(mode) + list(DIV_CASES).index(case)
                                + 1000 * DIV_TEACHERS.index(teacher))
    ref = kc_kernels.reference.linear_soft_target_loss(**p64, mode=mode, **kw)
    out = kc_kernels.linear_soft_target_loss(**p32, mode=mode, backend=backend, memory_budget=DIV_CASES[case][-1],
                                             **kw)
    _div_compare(out, ref, [p32[k] for k in DIV_LINEAR], [p64[k] for k in DIV_LINEAR], DIV_LINEAR)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("teacher", ["dense", "topk"])
@pytest.mark.parametrize("case", ["segments", "long_segment", "single_row"])
@pytest.mark.parametrize("mode", DIV_MODES)
def test_divergence_logits_gpu(mode, case, teacher, backend):
    """soft_target_loss on given logits: the long segment is walked once per phase, MIX reading its log-sums-exp
    from the constants of the finished statistics."""
    p64, p32, kw = _div_problem(case, teacher, 5000 + 10 * DIV_MODES.index(mode) + list(DIV_CASES).index(case))
    lg64, lg32 = _div_logits(p32)
    tk = [k for k in ("teacher_logits", "target_index", "target_value", "segments") if k in p32]
    ref = kc_kernels.reference.soft_target_loss(lg64, **{k: p64[k] for k in tk}, mode=mode, **kw)
    out = kc_kernels.soft_target_loss(lg32, **{k: p32[k] for k in tk}, mode=mode, backend=backend,
                                      memory_budget=DIV_CASES[case][-1], **kw)
    _div_compare(out, ref, [lg32], [lg64], ("logits",))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", DIV_MODES)
def test_divergence_sample_weight_beta_limits_and_masked_teacher_gpu(mode, backend):
    """Sample weights; jsd with beta 0 and 1 (kl and reverse_kl); a teacher of -inf at some classes (masked: 0 log 0
    adds 0, not NaN) under kl and jsd (reverse KL is infinite there)."""
    p64, p32, kw = _div_problem("segments", "dense", 77 + DIV_MODES.index(mode))
    sw = torch.rand(DIV_CASES["segments"][0], generator=torch.Generator().manual_seed(3)).to(DEVICE) + 0.5
    if mode != "reverse_kl":
        mask = torch.rand(p32["teacher_logits"].shape, generator=torch.Generator().manual_seed(4)).to(DEVICE) < 0.3
        mask[:, [0, 17, 230]] = False  # every segment keeps a class
        for p in (p32, p64):
            p["teacher_logits"] = p["teacher_logits"].masked_fill(mask, -math.inf)
    for beta in ((0.0, 1.0, 0.8) if mode == "jsd" else (0.5,)):
        kw["beta"] = beta
        ref = kc_kernels.reference.linear_soft_target_loss(**p64, mode=mode, sample_weight=sw.double(), **kw)
        out = kc_kernels.linear_soft_target_loss(**p32, mode=mode, sample_weight=sw, backend=backend, **kw)
        if torch.isfinite(ref):
            _div_compare(out, ref, [p32[k] for k in DIV_LINEAR], [p64[k] for k in DIV_LINEAR], DIV_LINEAR)
        else:  # reverse KL against a masked class, or jsd's beta = 1 limit on masked classes
            assert not torch.isfinite(out)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode,teacher", [("kl", "dense"), ("reverse_kl", "topk"), ("jsd", "head")])
def test_divergence_half_gpu(mode, teacher, dtype, backend):
    """Half inputs (half scores and teacher chunks, fp32 math) against the float64 reference on the same values."""
    p64, p32, kw = _div_problem("long_segment", teacher, 900 + DIV_MODES.index(mode))
    low = {k: (v.detach().to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
               and k != "target_value" else v) for k, v in p32.items()}
    high = {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in low.items()}
    for p in (low, high):
        for k in DIV_LINEAR:
            p[k] = p[k].requires_grad_()
    ref = kc_kernels.reference.linear_soft_target_loss(**high, mode=mode, **kw)
    out = kc_kernels.linear_soft_target_loss(**low, mode=mode, backend=backend, memory_budget=1, **kw)
    assert_close(out, ref, dtype, "loss")
    for name, a, e in zip(DIV_LINEAR, grads(out, [low[k] for k in DIV_LINEAR]),
                          grads(ref, [high[k] for k in DIV_LINEAR])):
        assert a.dtype == dtype, name
        assert_close(a, e, dtype, f"d{name}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", DIV_MODES)
def test_divergence_bitwise_identical_across_calls_gpu(mode, backend):
    p64, p32, kw = _div_problem("row_blocks", "head", 4242 + DIV_MODES.index(mode))
    outs = []
    for _ in range(2):
        loss = kc_kernels.linear_soft_target_loss(**p32, mode=mode, backend=backend, memory_budget=1, **kw)
        outs.append([loss] + grads(loss, [p32[k] for k in DIV_LINEAR]))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# the options of softmax and kl, through the custom op (they are not arguments of the public soft-target ops):
# softcap (0: off), z_loss, uniform_target
DIV_OPTIONS = {
    "softcap": (3.0, 0.0, 0.0),
    "z_loss": (0.0, 0.05, 0.0),
    "uniform": (0.0, 0.0, 2e-3),
    "all": (2.5, 0.05, 2e-3),
}


def _options_case(mode, target, option, case, linear, backend, check_loss=True):
    from kc_kernels.chunked import chunked_soft_target

    B, H, V, bounds, T, _, _, budget = DIV_CASES[case]
    softcap, z_loss, uniform = DIV_OPTIONS[option]
    p64, p32, _ = _div_problem(case, "dense" if target == "dense" else "topk",
                               7000 + list(DIV_OPTIONS).index(option) + 31 * list(DIV_CASES).index(case))
    reduction = "sum" if linear else "mean"
    if linear:
        names = DIV_LINEAR
        inputs32, inputs64 = [p32[k] for k in names], [p64[k] for k in names]
    else:
        lg64, lg32 = _div_logits(p32)
        inputs32, inputs64, names = [lg32], [lg64], ("logits",)
    args = [*(inputs32 if linear else [inputs32[0], None, None]), None, p32.get("target_index"),
            p32.get("target_value"), p32.get("teacher_logits"), None, None, None, None, p32.get("segments"), [], mode,
            reduction, T, [0.5, softcap, z_loss, uniform], backend, budget or 0, 7 if linear else 1]
    out = chunked_soft_target(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    tk = {k: p64[k] for k in ("teacher_logits", "target_index", "target_value", "segments") if k in p64}
    opts = dict(softcap=softcap or None, z_loss=z_loss, uniform_target=uniform)
    if linear:
        ref = kc_kernels.reference.linear_soft_target_loss(*inputs64, mode=mode, temperature=T, reduction=reduction,
                                                           **tk, **opts)
        u = kc_kernels.reference.linear_logits(*[t.detach() for t in inputs64])
    else:
        ref = kc_kernels.reference.soft_target_loss(inputs64[0], mode=mode, temperature=T, reduction=reduction,
                                                    **tk, **opts)
        u = inputs64[0].detach()
    if check_loss:
        assert_close(out[0], ref, torch.float32, "loss")
    for name, a, e in zip(names, out[2:], torch.autograd.grad(ref, inputs64)):
        assert_close(a, e, torch.float32, f"d{name}")
    y = (softcap * torch.tanh(u / softcap) if softcap else u) / T
    b = bounds or [0, V]
    lse = torch.stack([torch.logsumexp(y[:, lo:hi], dim=1) for lo, hi in zip(b[:-1], b[1:])], dim=1)
    assert_close(out[1], lse, torch.float32, "lse")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("option", list(DIV_OPTIONS))
@pytest.mark.parametrize("target", ["sparse", "dense"])
@pytest.mark.parametrize("mode", ["softmax", "kl"])
@pytest.mark.parametrize("case", ["segments", "row_blocks"])
def test_options_linear_gpu(case, mode, target, option, backend):
    if mode == "kl" and DIV_OPTIONS[option][2]:  # refused: kl's sum z log z over smoothed targets needs every class
        with pytest.raises(ValueError, match="^uniform_target: "):
            _options_case(mode, target, option, case, True, backend)
        return
    _options_case(mode, target, option, case, True, backend)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("option", list(DIV_OPTIONS))
@pytest.mark.parametrize("target", ["sparse", "dense"])
def test_options_logits_walked_per_phase_gpu(target, option, backend):
    _options_case("softmax", target, option, "long_segment", False, backend)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_options_of_linear_cross_entropy_gpu(backend):
    """The public front of the options: hard labels with label smoothing, z-loss and soft-capping, in row blocks."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(45, 16, generator=g) * 2).to(DEVICE)
    w = (torch.randn(800, 16, generator=g) / 2).to(DEVICE)
    lab = torch.randint(0, 800, (45,), generator=g).to(DEVICE)
    lab[3] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    x32, w32 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    out = kc_kernels.linear_cross_entropy(x32, w32, labels=lab, backend=backend, memory_budget=1, **kw)
    ref = kc_kernels.reference.cross_entropy_loss(x64 @ w64.t(), lab, **kw)
    _div_compare(out, ref, [x32, w32], [x64, w64], ("x", "weight"))
