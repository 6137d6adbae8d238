"""The cpu backend's bf16 path (bf16 GEMMs, bf16 scores, fp32 epilogue math) against the float64 reference, and the
fp32 path left as it was.

Tolerances, from the error analysis of the bf16 path (unit roundoff U = 2^-9 of bf16's 8-bit significand, round to
nearest): the inputs are rounded to bf16 before either side sees them, so the errors are those the path adds:
  (a) the scores u = x W^T are rounded to bf16 (|du| <= U |u|); the loss moves by sum q dy (q = dl/dy), at most
      U sum |q yh| (yh = a u, the part of the logit made from u), which on these problems is below 2 |l|;
      q moves by q'(y) dy, |q'| <= 1/4 (sigmoid) or a probability times 2 max|dy| (softmax): a second U-sized term;
  (b) the logit gradient is rounded to bf16 before the gradient GEMMs (U relative per element);
  (c) each chunk's dx = G W_c is rounded to bf16 before its fp32 accumulation, dW_c is stored in bf16 (U each);
  (d) every gradient is returned in the input's dtype, bf16 (U).
Loss: (a) alone, so |dl| <= 2U |l| with a factor 2 of margin: LOSS_RTOL = 4U (~7.8e-3; the errors are independent
and of both signs, so what is observed is ~1e-5). Gradients, norm-wise: (a) + (b) + (c) + (d) <= 4U, times 1.5 for
margin: GRAD_RTOL = 6U (~1.2e-2; observed ~1.5U, of which U comes from (d) alone). Element-wise the bound is the
same per element plus an absolute term for entries that are sums of terms cancelling each other (dx, dscale):
ELEM_RTOL = 8U of the element plus 8U of the tensor's largest element.
The fp32 path returns the same bf16-rounded gradients from fp32 GEMMs: its errors stay near U, those of (a)-(c) at
fp32 precision.
"""
import hashlib
import itertools

import pytest
import torch

import kc_kernels
from kc_kernels import _C
from kc_kernels.cpu import epilogue as cpu_st
from tests.helpers import grads, make_problem, rel_err

U = 2.0 ** -9
LOSS_RTOL = 4 * U
GRAD_RTOL = 6 * U
ELEM_RTOL = 8 * U
DIFF = ("x", "weight", "bias", "scale")
NATIVE = bool(_C.native_bf16())


@pytest.fixture
def bf16_on(monkeypatch):
    """The bf16 path, also on CPUs where bf16 is emulated (slower there, the same results)."""
    monkeypatch.setenv("KC_CPU_BF16", "1")


def _run(p, backend, **kw):
    rest = {k: v for k, v in p.items() if k not in ("x", "weight", "bias")}
    return kc_kernels.linear_soft_target_loss(p["x"], p["weight"], p["bias"], backend=backend, **rest, **kw)


def _bf16_pair(p64, teacher_bf16=False):
    """(float64 problem on bf16-rounded values, the same values as bf16 tensors), gradients required; the teacher
    logits too when ``teacher_bf16`` (else they stay float64, read as fp32 by the cpu backend)."""
    ref, low = dict(p64), dict(p64)
    for k in DIFF + ("sample_weight",) + (("teacher_logits",) if teacher_bf16 else ()):
        if p64.get(k) is not None:
            low[k] = p64[k].to(torch.bfloat16)
            ref[k] = low[k].double()
    for d in (ref, low):
        for k in DIFF:
            if d.get(k) is not None:
                d[k] = d[k].detach().clone().requires_grad_()
    return ref, low


def _assert_grad_close(a, e, what):
    assert a.dtype == torch.bfloat16, f"{what} dtype {a.dtype}"
    a, e = a.detach().double(), e.detach().double()
    assert torch.isfinite(a).all(), f"{what}: not finite"
    err = rel_err(a, e)
    assert err <= GRAD_RTOL, f"{what}: norm-wise relative error {err:.2e} > {GRAD_RTOL:.2e}"
    bound = ELEM_RTOL * (e.abs() + e.abs().max())
    worst = ((a - e).abs() - bound).max().item()
    assert worst <= 0, f"{what}: an element is off by {worst:.2e} more than its bound"


def _check_bf16_against_reference(p64, *, memory_budget=None, teacher_bf16=False, **kw):
    ref_p, low_p = _bf16_pair(p64, teacher_bf16)
    ref = _run(ref_p, "reference", **kw)
    out = _run(low_p, "cpu", memory_budget=memory_budget, **kw)
    assert out.dtype == torch.float32
    r, o = ref.detach().double(), out.detach().double()
    assert torch.isfinite(o).all()
    assert torch.allclose(o, r, rtol=LOSS_RTOL, atol=LOSS_RTOL * r.abs().max().item()), (
        f"loss: rel err {rel_err(o, r):.2e} > {LOSS_RTOL:.2e}")
    for name, a, e in zip(DIFF, grads(out, [low_p.get(k) for k in DIFF]), grads(ref, [ref_p.get(k) for k in DIFF])):
        if e is not None:
            _assert_grad_close(a, e, f"d{name}")


CASES = list(itertools.product(("sigmoid", "softmax"), ("sparse", "dense"), (None, "segment", "class")))


@pytest.mark.parametrize("mode,target_form,scale_kind", CASES)
def test_bf16_matches_reference(mode, target_form, scale_kind, bf16_on):
    """Odd shapes: V=1001 (no multiple of the chunk), B in {1, 6, 70}, K=5 with -1 padding, flat / segmented /
    grouped layouts, and a budget of 256 columns: every segment (333 classes or the flat 1001) is longer than a chunk,
    so the row-block walk runs (B=70: blocks of 32 rows) where the loss has segment statistics."""
    i = CASES.index((mode, target_form, scale_kind))
    gen = torch.Generator().manual_seed(9100 + i)
    B = (1, 6, 70)[i % 3]
    layout = ("flat", "segments", "grouped", "segments")[i % 4]
    p = make_problem(B, 24, 1001, G=None if layout == "flat" else 3, grouped=layout == "grouped", gen=gen,
                     scale_kind=scale_kind, target_form=target_form, sample_weight=i % 2 == 1, K=5)
    # budget: 256 columns of bf16 scores (a bf16 teacher adds 4 bytes a column for its fp32 copy)
    teacher_bf16 = target_form == "dense" and i % 2 == 1
    _check_bf16_against_reference(p, memory_budget=(6 if teacher_bf16 else 2) * B * 256, teacher_bf16=teacher_bf16,
                                  mode=mode, temperature=(1.0, 1.7, 0.6)[i % 3],
                                  reduction=("mean", "sum", "none")[i % 3])


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_bf16_hard_labels_default_budget(mode, bf16_on):
    """Hard labels (one target of value 1 per row) in one chunk of the default budget, as the benchmarks run it."""
    gen = torch.Generator().manual_seed(77)
    p = make_problem(9, 40, 3001, gen=gen, K=1)
    p["target_index"] = torch.randint(0, 3001, (9, 1), generator=gen)
    p["target_value"] = torch.ones(9, 1, dtype=torch.float64)
    _check_bf16_against_reference(p, mode=mode)


def test_bf16_path_is_taken_and_differs_from_the_fp32_path(monkeypatch):
    """KC_CPU_BF16 picks the work dtype; the two paths agree to bf16 accuracy but not bit for bit (the GEMMs differ),
    which shows that the bf16 GEMMs really ran."""
    p = make_problem(8, 32, 500, G=2, gen=torch.Generator().manual_seed(3), K=4, dtype=torch.bfloat16)
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("KC_CPU_BF16", flag)
        assert cpu_st.CpuEpilogue.work_dtype(torch.bfloat16) == (torch.bfloat16 if flag == "1" else torch.float32)
        q = {k: (v.detach().clone().requires_grad_() if k in DIFF and v is not None else v) for k, v in p.items()}
        loss = _run(q, "cpu", mode="softmax")
        outs[flag] = [loss] + grads(loss, [q.get(k) for k in DIFF])
    assert any(not torch.equal(a, b) for a, b in zip(outs["0"], outs["1"]) if a is not None)
    for a, b in zip(outs["0"], outs["1"]):
        if a is not None:
            assert rel_err(b, a) <= GRAD_RTOL
    monkeypatch.delenv("KC_CPU_BF16")
    assert cpu_st.bf16_enabled() == NATIVE
    for dt in (torch.float32, torch.float16, torch.float64):
        assert cpu_st.CpuEpilogue.work_dtype(dt) == torch.float32


def test_bf16_env_value_is_checked(monkeypatch):
    monkeypatch.setenv("KC_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="KC_CPU_BF16"):
        cpu_st.bf16_enabled()


def test_scores_dtype_is_checked_at_the_binding():
    a = _C.SoftTargetChunkParams()
    lo, seg = torch.tensor([0, 4]), torch.tensor([0])
    state = torch.zeros(13, 1, 1, dtype=torch.float64)
    sp = torch.zeros(1, dtype=torch.float64)
    u = torch.zeros(1, 4)
    a.u, a.ld, a.rows, a.ncols, a.npieces, a.num_segments = u.data_ptr(), 4, 1, 4, 1, 1
    a.piece_lo, a.piece_seg, a.state, a.softplus_sum = lo.data_ptr(), seg.data_ptr(), state.data_ptr(), sp.data_ptr()
    a.phases, a.inv_t, a.t2 = 8, 1.0, 1.0
    a.scores_dtype = 7
    with pytest.raises(ValueError, match="scores_dtype"):
        _C.soft_target_chunk(a)
    a.scores_dtype = _C.SCORES_DTYPES["F32"]
    _C.soft_target_chunk(a)  # loss only, zero scores: softplus(0) = log 2 per class
    assert abs(sp.item() - 4 * 0.6931471805599453) < 1e-6


@pytest.mark.parametrize("mode,target_form,scale_kind", CASES)
def test_bf16_scores_epilogue_is_exactly_the_fp32_one(mode, target_form, scale_kind, monkeypatch):
    """Given bf16 logits (no GEMM), both paths compute the same fp32 math on the same widened scores and round the
    logit gradient to bf16 once, to nearest even: bit for bit the same outputs, over several chunks and a segment
    longer than a chunk (the budgets give both paths 256-column chunks)."""
    i = CASES.index((mode, target_form, scale_kind))
    gen = torch.Generator().manual_seed(9300 + i)
    B, V = 5, 900
    logits = (torch.randn(B, V, generator=gen) * 3).to(torch.bfloat16)
    segs = torch.tensor([0, 100, 101, 700, 900])
    kw = dict(mode=mode, segments=segs, temperature=1.4)
    if target_form == "dense":
        kw["teacher_logits"] = torch.randn(B, V, generator=gen)
    else:
        kw["target_index"] = torch.randint(-1, V, (B, 6), generator=gen)
        kw["target_value"] = torch.rand(B, 6, generator=gen)
    scale = None
    if scale_kind is not None:
        scale = (torch.rand(4 if scale_kind == "segment" else V, generator=gen) + 0.5).to(torch.bfloat16)
    outs = {}
    for flag, itemsize in (("0", 4), ("1", 2)):
        monkeypatch.setenv("KC_CPU_BF16", flag)
        lg = logits.clone().requires_grad_()
        sc = None if scale is None else scale.clone().requires_grad_()
        loss = kc_kernels.soft_target_loss(lg, scale=sc, backend="cpu", memory_budget=itemsize * B * 256, **kw)
        outs[flag] = [loss] + grads(loss, [lg, sc])
    for a, b in zip(outs["0"], outs["1"]):
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), (a, b)


# ---------------------------------------------------------------------------------------- the fp32 path unchanged
# Digests (sha256, 16 hex digits) of the loss and gradients of fp32 problems, recorded per machine
# (`python -m tests.test_cpu_bf16` prints the machine's key and its digests). They guard the fp32 arithmetic of the CPU
# path against unintended changes (a refactor, the bf16 translation unit, build flags): an intended change (a new
# formula) records them again, and says so. The bits depend on the CPU (vector width, BLAS kernels), the thread
# count and the torch build, so they are kept per machine (keyed by _machine()) and compared where this machine
# has a row.
GOLDEN = {
    ('Intel(R) Xeon(R) Processor', 'fbb863ef93cd', 'AVX512', 2, '2.13.0+cpu'): {
        ('sigmoid', 'sparse', None, None, 'logits'): '838be73b6c89426f',
        ('sigmoid', 'sparse', None, 5120, 'logits'): '838be73b6c89426f',
        ('sigmoid', 'sparse', None, None, 'linear'): 'f6fbbad34103f7d2',
        ('sigmoid', 'sparse', 'segment', None, 'logits'): '6d296956f3cd0748',
        ('sigmoid', 'sparse', 'segment', 5120, 'logits'): '197c7a7122f3fcc3',
        ('sigmoid', 'sparse', 'segment', None, 'linear'): '59f661b0470e6da5',
        ('sigmoid', 'sparse', 'class', None, 'logits'): '9b17c5f18f784091',
        ('sigmoid', 'sparse', 'class', 5120, 'logits'): '626f841da71a625f',
        ('sigmoid', 'sparse', 'class', None, 'linear'): 'acc80ff24399ff07',
        ('sigmoid', 'dense', None, None, 'logits'): '0318e889de87110f',
        ('sigmoid', 'dense', None, 5120, 'logits'): '0318e889de87110f',
        ('sigmoid', 'dense', None, None, 'linear'): 'c3c806bda42a7b8e',
        ('sigmoid', 'dense', 'segment', None, 'logits'): 'ab90c0f9e80b9cec',
        ('sigmoid', 'dense', 'segment', 5120, 'logits'): '5138220af36a1931',
        ('sigmoid', 'dense', 'segment', None, 'linear'): '777e98f1f644b8b5',
        ('sigmoid', 'dense', 'class', None, 'logits'): '24c0ba1f2256c58d',
        ('sigmoid', 'dense', 'class', 5120, 'logits'): '571606ee87bf75ce',
        ('sigmoid', 'dense', 'class', None, 'linear'): 'e96a3fa5a5315461',
        ('softmax', 'sparse', None, None, 'logits'): 'd3c57a962dd3a6d3',
        ('softmax', 'sparse', None, 5120, 'logits'): '8b658736cce21afa',
        ('softmax', 'sparse', None, None, 'linear'): 'e3525375c365ec9a',
        ('softmax', 'sparse', 'segment', None, 'logits'): 'bc333b081924b686',
        ('softmax', 'sparse', 'segment', 5120, 'logits'): '602eefc38eef1d75',
        ('softmax', 'sparse', 'segment', None, 'linear'): 'b8f181ccacdf05d8',
        ('softmax', 'sparse', 'class', None, 'logits'): 'ace57e6413b9879f',
        ('softmax', 'sparse', 'class', 5120, 'logits'): '999d9d85134b1d83',
        ('softmax', 'sparse', 'class', None, 'linear'): '32dc532f4140d759',
        ('softmax', 'dense', None, None, 'logits'): '4a78ea331eccd6b9',
        ('softmax', 'dense', None, 5120, 'logits'): 'f7edbd829b6e9360',
        ('softmax', 'dense', None, None, 'linear'): 'bd00c4be8572b0af',
        ('softmax', 'dense', 'segment', None, 'logits'): '967585ca2ed1bf49',
        ('softmax', 'dense', 'segment', 5120, 'logits'): 'bed03037d62e9a17',
        ('softmax', 'dense', 'segment', None, 'linear'): 'bdbba5636e94f4c7',
        ('softmax', 'dense', 'class', None, 'logits'): 'cd32ad036ff9cac4',
        ('softmax', 'dense', 'class', 5120, 'logits'): '50469bc503ff99d2',
        ('softmax', 'dense', 'class', None, 'linear'): '823a104f050ca62b',
    },
    ('AMD EPYC', '81c21573e385', 'AVX512', 2, '2.13.0+cpu'): {
        ('sigmoid', 'sparse', None, None, 'logits'): '960f2b9dd1b193e2',
        ('sigmoid', 'sparse', None, 5120, 'logits'): '960f2b9dd1b193e2',
        ('sigmoid', 'sparse', None, None, 'linear'): '8ce03a07f2e8ee6e',
        ('sigmoid', 'sparse', 'segment', None, 'logits'): '6709965fb444a870',
        ('sigmoid', 'sparse', 'segment', 5120, 'logits'): 'f46ac3283c8547e7',
        ('sigmoid', 'sparse', 'segment', None, 'linear'): '08ca02c15f2d1624',
        ('sigmoid', 'sparse', 'class', None, 'logits'): 'bbd6ae7d3c984537',
        ('sigmoid', 'sparse', 'class', 5120, 'logits'): 'f60148b302d996cd',
        ('sigmoid', 'sparse', 'class', None, 'linear'): 'bc5ad30de10e7180',
        ('sigmoid', 'dense', None, None, 'logits'): '64410cf90290019b',
        ('sigmoid', 'dense', None, 5120, 'logits'): '64410cf90290019b',
        ('sigmoid', 'dense', None, None, 'linear'): 'c05e04a6e5c89a6f',
        ('sigmoid', 'dense', 'segment', None, 'logits'): '37c1a9140a9fc920',
        ('sigmoid', 'dense', 'segment', 5120, 'logits'): '94f68347801a3b4f',
        ('sigmoid', 'dense', 'segment', None, 'linear'): '9474b0991aad4238',
        ('sigmoid', 'dense', 'class', None, 'logits'): '2026ff0d198db170',
        ('sigmoid', 'dense', 'class', 5120, 'logits'): 'e210ae7fc0d64c66',
        ('sigmoid', 'dense', 'class', None, 'linear'): '76ce76fdf10ff05b',
        ('softmax', 'sparse', None, None, 'logits'): '73d78139cd2d95a5',
        ('softmax', 'sparse', None, 5120, 'logits'): '7cee5ee114dfea16',
        ('softmax', 'sparse', None, None, 'linear'): '8b0e0bfd01a78d74',
        ('softmax', 'sparse', 'segment', None, 'logits'): '871b0b3103eb5268',
        ('softmax', 'sparse', 'segment', 5120, 'logits'): 'f85da3d00ac0a645',
        ('softmax', 'sparse', 'segment', None, 'linear'): '25f5a23f46df838b',
        ('softmax', 'sparse', 'class', None, 'logits'): 'c0ffcc00e6a004e2',
        ('softmax', 'sparse', 'class', 5120, 'logits'): '9e4f13e9b9d45c5f',
        ('softmax', 'sparse', 'class', None, 'linear'): 'b64ea71825a6a077',
        ('softmax', 'dense', None, None, 'logits'): 'f3a862ec502ded3a',
        ('softmax', 'dense', None, 5120, 'logits'): 'a14d60718068cd8a',
        ('softmax', 'dense', None, None, 'linear'): '9ed67ac892dd4044',
        ('softmax', 'dense', 'segment', None, 'logits'): 'b52dc6b645b2ad9b',
        ('softmax', 'dense', 'segment', 5120, 'logits'): 'e2d8cbd3d706fe67',
        ('softmax', 'dense', 'segment', None, 'linear'): 'e1a58073fac47801',
        ('softmax', 'dense', 'class', None, 'logits'): 'fc5d160fefabb14e',
        ('softmax', 'dense', 'class', 5120, 'logits'): '2be6997083629d30',
        ('softmax', 'dense', 'class', None, 'linear'): '72c7f6194dccd03f',
    },
}


def _machine():
    """The recording machine's identity: CPU model, the CPU's feature flags and cache size (a VM's model name is
    often generic, and -march=native compiles for the flags), torch's vector ISA, threads and torch version."""
    model, cpu = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().split("\n\n")[0].splitlines()
        fields = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in info if ":" in ln}
        model = fields.get("model name", "")
        flags = " ".join(sorted(fields.get("flags", "").split()))
        cpu = hashlib.sha256(f"{flags}|{fields.get('cache size', '')}".encode()).hexdigest()[:12]
    except OSError:
        pass
    return (model, cpu, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), torch.__version__)


def _digest(ts):
    h = hashlib.sha256()
    for t in ts:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def golden_digests():
    out = {}
    for i, (mode, form, sk) in enumerate(CASES):
        g = torch.Generator().manual_seed(900 + i)
        p = make_problem(5, 8, 700, G=3, gen=g, scale_kind=sk, target_form=form, K=4, dtype=torch.float32)
        logits = (p["x"] @ p["weight"].t()).detach().requires_grad_()
        s = p.get("scale")
        if s is not None:
            s.requires_grad_()
        kw = {k: p[k] for k in ("target_index", "target_value", "teacher_logits", "segments") if k in p}
        for budget in (None, 4 * 5 * 256):
            loss = kc_kernels.soft_target_loss(logits, scale=s, mode=mode, backend="cpu", temperature=1.3,
                                               memory_budget=budget, **kw)
            gl = torch.autograd.grad(loss, [logits] + ([s] if s is not None else []))
            out[(mode, form, sk, budget, "logits")] = _digest([loss, *gl])
        x, w, b = (p[k].requires_grad_() for k in ("x", "weight", "bias"))
        loss = kc_kernels.linear_soft_target_loss(x, w, b, scale=s, mode=mode, backend="cpu", temperature=1.3, **kw)
        gl = torch.autograd.grad(loss, [x, w, b] + ([s] if s is not None else []))
        out[(mode, form, sk, None, "linear")] = _digest([loss, *gl])
    return out


@pytest.mark.skipif(_machine() not in GOLDEN, reason="no fp32 digests recorded for this CPU/torch/threads")
def test_fp32_path_bits_unchanged():
    golden = GOLDEN[_machine()]
    got = golden_digests()
    assert set(got) == set(golden)
    wrong = [k for k in golden if got[k] != golden[k]]
    assert not wrong, f"fp32 results changed bits in {wrong}"


if __name__ == "__main__":
    print(f"    {_machine()!r}: {{")
    for key, value in golden_digests().items():
        print(f"        {key!r}: {value!r},")
    print("    },")
