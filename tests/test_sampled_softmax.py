"""Sampled softmax backends against the float64 reference and a brute-force loop; sampler statistics; training."""
import math
import os
import subprocess
import sys

import pytest
import torch

import kc_kernels
from kc_kernels import reference, samplers
from tests.conftest import HAS_CUDA
from tests.helpers import assert_close, grads
from tests.test_sampled_reference import brute_force_sampled

HAS_TRITON = bool(kc_kernels.backends()["triton"])
DEVICE = "cuda" if HAS_CUDA else "cpu"

# (B, H, V, S, T): T None means labels [B]; every table has an odd shape
SHAPES = [
    (1, 7, 31, 1, None),  # one row, one sample
    (5, 16, 64, 9, None),
    (6, 13, 50, 17, 3),  # padded multi-label rows, duplicate labels
    (33, 70, 300, 65, 2),  # tails in every tile dimension
]


def make_sampled_problem(B, H, V, S, T, dtype=torch.float64, seed=0, device="cpu", bias=True):
    """Inputs with padded rows, a repeated label and accidental hits; fixed samples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, generator=g)
    w = torch.randn(V, H, generator=g) / math.sqrt(H) * 2
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    if T is None:
        labels = torch.randint(0, V, (B,), generator=g)
        lab2 = labels[:, None]
    else:
        labels = torch.randint(0, V, (B, T), generator=g)
        if B > 1 and T > 1:
            labels[0, 1:] = -1  # padding
            labels[1, 1] = labels[1, 0]  # the same label twice: target 2/T
        lab2 = labels
    ids = torch.randperm(V, generator=g)[:S]
    ids[0] = lab2[0, 0]  # accidental hit on row 0
    if S > 2 and B > 1:
        ids[2] = lab2[B - 1, 0]
    true_exp = torch.rand(labels.shape, generator=g, dtype=torch.float64) + 0.05
    samp_exp = torch.rand(S, generator=g, dtype=torch.float64) + 0.05
    tensors = [x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)]
    x, w, b = (None if t is None else t.to(device).requires_grad_() for t in tensors)
    sampled = (ids.to(device), true_exp.to(device), samp_exp.to(device))
    return x, w, b, labels.to(device), sampled


def _reference_and_backend(backend, dtype, shape, *, remove_hits=True, subtract_log_q=True, reduction="mean",
                           sparse_grad=False, sample_weight=False, bias=True, seed=0):
    x, w, b, labels, sampled = make_sampled_problem(*shape, dtype=dtype, seed=seed, device=DEVICE, bias=bias)
    sw = None
    if sample_weight:
        sw = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    kw = dict(sampled=sampled, remove_accidental_hits=remove_hits, subtract_log_q=subtract_log_q,
              reduction=reduction, sample_weight=sw)
    out = kc_kernels.sampled_softmax_loss(x, w, b, labels, backend=backend, sparse_grad=sparse_grad, **kw)
    got = [out] + grads(out, [x, w, b])
    # the oracle: float64 reference on the same (rounded) inputs
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    sw64 = None if sw is None else sw.double()
    ref = reference.sampled_softmax_loss(x64, w64, b64, labels, **{**kw, "sample_weight": sw64})
    expected = [ref] + grads(ref, [x64, w64, b64])
    return got, expected


def _check(got, expected, dtype, sparse_grad=False):
    for name, a, e in zip(("loss", "dx", "dweight", "dbias"), got, expected):
        if e is None:
            assert a is None, name
            continue
        if name in ("dweight", "dbias"):
            assert a.is_sparse == sparse_grad, f"{name} layout {a.layout}"
            if sparse_grad:
                a = a.to_dense()
        if name != "loss":
            assert a.dtype == dtype, f"{name} dtype {a.dtype}"
        assert_close(a, e, dtype, what=name)


# ------------------------------------------------------------------------------------------------------ cpu backend

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("remove_hits,subtract_log_q", [(True, True), (False, False), (True, False)])
def test_cpu_matches_reference(shape, dtype, remove_hits, subtract_log_q):
    if DEVICE != "cpu":
        pytest.skip("the cpu backend takes CPU tensors")
    got, expected = _reference_and_backend("cpu", dtype, shape, remove_hits=remove_hits,
                                           subtract_log_q=subtract_log_q)
    _check(got, expected, dtype)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_cpu_reductions_sample_weight_sparse(shape, reduction, sparse_grad):
    if DEVICE != "cpu":
        pytest.skip("the cpu backend takes CPU tensors")
    got, expected = _reference_and_backend("cpu", torch.float64, shape, reduction=reduction, sparse_grad=sparse_grad,
                                           sample_weight=True)
    _check(got, expected, torch.float64, sparse_grad)


def test_cpu_without_bias_and_half_inputs():
    got, expected = _reference_and_backend("cpu", torch.float64, SHAPES[2], bias=False)
    _check(got, expected, torch.float64)
    got, expected = _reference_and_backend("cpu", torch.bfloat16, SHAPES[2])
    assert got[0].dtype == torch.float32  # the loss stays in fp32
    _check(got, expected, torch.bfloat16)


@pytest.mark.parametrize("remove_hits", [False, True])
def test_cpu_matches_brute_force(remove_hits):
    x, w, b, labels, (ids, te, se) = make_sampled_problem(6, 5, 23, 8, 3)
    ids = torch.cat([ids, ids[:2]])  # sampling without ``unique`` repeats ids
    se = torch.cat([se, se[:2]])
    out = kc_kernels.sampled_softmax_loss(x, w, b, labels, sampled=(ids, te, se), backend="cpu",
                                          remove_accidental_hits=remove_hits, reduction="none")
    bf = brute_force_sampled(x, w, b, labels, ids, te, se, remove_hits, True, "none")
    assert_close(out, bf, what="loss")
    for name, a, e in zip(("dx", "dweight", "dbias"), grads(out, [x, w, b]), grads(bf, [x, w, b])):
        assert_close(a, e, what=name)


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton backend unavailable"))])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_tensorflow_accidental_hits_masks_only_the_last_copy(backend, reduction):
    """A row's label drawn four times: accidental_hits="tensorflow" masks its last copy only (the others stay in
    the softmax), "all" masks every copy; each backend against the reference's definition of both.
    tests/test_sampled_tensorflow.py checks the same against TensorFlow itself."""
    if backend == "cpu" and DEVICE != "cpu":
        pytest.skip("the cpu backend takes CPU tensors")
    dtype = torch.float32 if backend == "triton" else torch.float64
    x, w, b, labels, (ids, te, se) = make_sampled_problem(6, 5, 23, 8, 3, dtype=dtype, device=DEVICE)
    ids = ids.clone()
    ids[[1, 4, 6]] = labels[0, 0]  # with ids[0]: four copies of row 0's label
    sampled64 = (ids.cpu(), te.cpu(), se.cpu())
    x64, w64, b64 = (t.detach().cpu().double().requires_grad_() for t in (x, w, b))
    for mode in ("tensorflow", "all"):
        out = kc_kernels.sampled_softmax_loss(x, w, b, labels, sampled=(ids, te, se), backend=backend,
                                              accidental_hits=mode, reduction=reduction)
        ref = reference.sampled_softmax_loss(x64, w64, b64, labels.cpu(), sampled=sampled64, accidental_hits=mode,
                                             reduction=reduction)
        assert_close(out, ref, dtype, what=f"{mode} loss")
        for name, a, e in zip(("dx", "dweight", "dbias"), grads(out, [x, w, b]), grads(ref, [x64, w64, b64])):
            assert_close(a, e, dtype, what=f"{mode} {name}")
    rows = {mode: reference.sampled_softmax_loss(x64, w64, b64, labels.cpu(), sampled=sampled64,
                                                 accidental_hits=mode, reduction="none").detach()
            for mode in ("tensorflow", "all")}
    hit_rows = (labels.cpu()[:, :, None] == ids.cpu()).any(dim=(1, 2))
    repeated = ids.cpu()[(ids.cpu()[:, None] == ids.cpu()).sum(dim=1) > 1]
    twice = (labels.cpu()[:, :, None] == repeated).any(dim=(1, 2))
    assert twice[0] and bool(hit_rows.any())
    assert bool((rows["tensorflow"][twice] > rows["all"][twice]).all())  # three copies back in the denominator
    assert torch.equal(rows["tensorflow"][~twice], rows["all"][~twice])


def test_last_copies_and_accidental_hits_choice():
    from kc_kernels.ops.sampled_softmax_autograd import last_copies

    ids = torch.tensor([3, 1, 3, 5, 3, 1])
    assert last_copies(ids).tolist() == [False, False, False, True, True, True]  # TensorFlow keeps position 4 of 3
    x, w, b, labels, sampled = make_sampled_problem(5, 16, 64, 9, None)
    with pytest.raises(ValueError, match="accidental_hits"):
        kc_kernels.sampled_softmax_loss(x, w, b, labels, sampled=sampled, accidental_hits="first")


def test_sparse_grad_holds_only_touched_rows():
    x, w, b, labels, sampled = make_sampled_problem(6, 13, 50, 17, 3)
    loss = kc_kernels.sampled_softmax_loss(x, w, b, labels, sampled=sampled, sparse_grad=True, backend="cpu")
    loss.backward()
    touched = torch.unique(torch.cat([sampled[0], labels[labels >= 0]]))
    for g in (w.grad, b.grad):
        assert g.is_sparse
        assert torch.equal(g.coalesce().indices()[0], touched)
    # an optimiser that takes sparse gradients steps only those rows
    before = w.detach().clone()
    torch.optim.SGD([w, b], lr=0.1).step()
    changed = (w.detach() != before).any(dim=1).nonzero().squeeze(1)
    assert set(changed.tolist()) <= set(touched.tolist())


def test_no_grad_call_and_repeated_backward_scale():
    x, w, b, labels, sampled = make_sampled_problem(5, 16, 64, 9, None)
    with torch.no_grad():
        l0 = kc_kernels.sampled_softmax_loss(x, w, b, labels, sampled=sampled, backend="cpu")
    loss = kc_kernels.sampled_softmax_loss(x, w, b, labels, sampled=sampled, backend="cpu")
    assert_close(l0, loss, what="loss")
    (3.0 * loss).backward()  # grad_output != 1 scales the gradients computed in forward
    ref = reference.sampled_softmax_loss(x, w, b, labels, sampled=sampled)
    for a, e in zip((x.grad, w.grad, b.grad), grads(3.0 * ref, [x, w, b])):
        assert_close(a, e, what="grad")


def test_drawn_samples_same_for_every_backend():
    """With a seeded generator the op draws the same candidates, so backends agree."""
    x, w, b, labels, _ = make_sampled_problem(8, 16, 500, 1, 2)
    outs = []
    for backend in ("reference", "cpu"):
        g = torch.Generator().manual_seed(3)
        outs.append(kc_kernels.sampled_softmax_loss(x, w, b, labels, num_sampled=40, generator=g, backend=backend))
    assert_close(outs[1], outs[0], what="loss")


# --------------------------------------------------------------------------------------------------- triton backend
# On CPU this runs under TRITON_INTERPRET=1 (tests/conftest.py): small shapes; bf16 tl.dot is wrong there.

triton_only = pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable")
TRITON_DTYPES = [torch.float32, torch.float16, torch.float64]


@triton_only
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, dtype):
    got, expected = _reference_and_backend("triton", dtype, shape, sample_weight=True)
    _check(got, expected, dtype)


@triton_only
@pytest.mark.parametrize("remove_hits,subtract_log_q,reduction,sparse_grad,bias", [
    (False, False, "sum", False, True),
    (True, False, "none", True, True),
    (False, True, "none", False, False),
    (True, True, "mean", True, False),
])
def test_triton_flags(remove_hits, subtract_log_q, reduction, sparse_grad, bias):
    got, expected = _reference_and_backend("triton", torch.float32, SHAPES[2], remove_hits=remove_hits,
                                           subtract_log_q=subtract_log_q, reduction=reduction,
                                           sparse_grad=sparse_grad, bias=bias)
    _check(got, expected, torch.float32, sparse_grad)


@triton_only
@pytest.mark.parametrize("dtype,splits", [(torch.float32, 1), (torch.float16, 2)])
def test_triton_many_tiles(monkeypatch, dtype, splits):
    """Small blocks, so every loop runs several tiles and ends on a partial one; the forward's samples split
    across programs (5 tiles in 2 splits: 3 + 2, the last one partial)."""
    from kc_kernels.triton import sampled_softmax as ts

    monkeypatch.setattr(ts, "BLOCK_CAPS", (16, 16, 16))
    monkeypatch.setattr(ts, "FWD_SPLITS", splits)
    got, expected = _reference_and_backend("triton", dtype, (37, 41, 200, 70, 2), reduction="none")
    _check(got, expected, dtype)


@triton_only
def test_triton_matches_brute_force_with_repeated_ids():
    x, w, b, labels, (ids, te, se) = make_sampled_problem(6, 5, 23, 8, 3, dtype=torch.float32, device=DEVICE)
    ids, se = torch.cat([ids, ids[:2]]), torch.cat([se, se[:2]])  # sampling without ``unique`` repeats ids
    out = kc_kernels.sampled_softmax_loss(x, w, b, labels, sampled=(ids, te, se), backend="triton", reduction="none")
    x64, w64, b64 = (t.detach().cpu().double().requires_grad_() for t in (x, w, b))
    bf = brute_force_sampled(x64, w64, b64, labels.cpu(), ids.cpu(), te.cpu(), se.cpu(), True, True, "none")
    assert_close(out, bf, torch.float32, what="loss")
    for name, a, e in zip(("dx", "dweight", "dbias"), grads(out, [x, w, b]), grads(bf, [x64, w64, b64])):
        assert_close(a, e, torch.float32, what=name)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=triton_only)])
def test_gradients_only_where_asked(backend):
    """x without requires_grad and no bias: only weight gets a gradient."""
    if backend == "cpu" and DEVICE != "cpu":
        pytest.skip("the cpu backend takes CPU tensors")
    x, w, _, labels, sampled = make_sampled_problem(5, 16, 64, 9, 2, dtype=torch.float32, device=DEVICE, bias=False)
    x = x.detach()
    loss = kc_kernels.sampled_softmax_loss(x, w, None, labels, sampled=sampled, backend=backend)
    loss.backward()
    w64 = w.detach().double().requires_grad_()
    ref = reference.sampled_softmax_loss(x.double(), w64, None, labels, sampled=sampled)
    assert x.grad is None
    assert_close(w.grad, torch.autograd.grad(ref, w64)[0], torch.float32, what="dweight")


@pytest.mark.compile_check  # minutes, no GPU needed: run with -m compile_check
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "compile_sampled_softmax_kernels.py")
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or not HAS_TRITON, reason="needs a CUDA device")
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_bf16_on_gpu(shape):
    got, expected = _reference_and_backend("triton", torch.bfloat16, shape)
    _check(got, expected, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ sampler statistics

def _chi_square_critical(dof: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square(dof) by the Wilson-Hilferty approximation (no scipy needed)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


@pytest.mark.parametrize("unique", [False, True])
@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_expected_counts_match_empirical_frequencies(sampler, unique):
    """Over many draws, how often each class is drawn matches the summed expected counts (chi-square, fixed seed).

    Under unique sampling each class is drawn at most once per draw (a Bernoulli, variance below its mean), so
    the Poisson-style statistic is conservative there.
    """
    V, S, draws = 200, 20, 2000
    g = torch.Generator().manual_seed(0)
    counts = torch.arange(1, V + 1).double()
    observed = torch.zeros(V, dtype=torch.float64)
    expected = torch.zeros(V, dtype=torch.float64)
    every = torch.arange(V)
    for _ in range(draws):
        cand = samplers.sample_candidates(sampler, S, V, unique=unique, class_counts=counts, distortion=0.75,
                                          generator=g)
        observed += torch.bincount(cand.ids, minlength=V).double()
        expected += cand.expected_count(every, S, unique)
    assert expected.min() > 5  # every cell large enough for the chi-square approximation
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < _chi_square_critical(V - 1), f"chi2 {chi2:.1f} over {V - 1} degrees of freedom"


def test_op_draws_tensorflow_expected_counts():
    """The op passes the sampler's expected counts for labels and samples (checked through subtract_log_q)."""
    x, w, b, labels, _ = make_sampled_problem(4, 8, 300, 1, None)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    loss = kc_kernels.sampled_softmax_loss(x, w, b, labels, num_sampled=30, sampler="uniform", unique=False,
                                           generator=g1, reduction="none", backend="cpu")
    cand = samplers.sample_candidates("uniform", 30, 300, unique=False, generator=g2)
    exp = torch.full((4,), 30 / 300, dtype=torch.float64)
    sampled = (cand.ids, exp, torch.full((30,), 0.1, dtype=torch.float64))
    ref = reference.sampled_softmax_loss(x, w, b, labels, sampled=sampled, reduction="none")
    assert_close(loss, ref, what="loss")


# ------------------------------------------------------------------------------------------------------- training

def test_sampled_softmax_trains_like_the_full_softmax():
    """A linear classifier over 10K classes (Zipf-distributed labels, clustered features) trained with sampled
    softmax (log-uniform sampler, 256 negatives) ends within a few points of the full softmax's accuracy."""
    V, H, B, steps = 10_000, 32, 128, 200
    centers = torch.randn(V, H, generator=torch.Generator().manual_seed(0))
    class_p = samplers.class_probabilities("log_uniform", V).float()

    def batch(n, gen):
        y = torch.multinomial(class_p, n, replacement=True, generator=gen)
        return centers[y] + 0.6 * torch.randn(n, H, generator=gen), y

    x_test, y_test = batch(4000, torch.Generator().manual_seed(99))

    def train(sampled: bool) -> float:
        data_gen, sample_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        w = torch.zeros(V, H, requires_grad=True)
        b = torch.zeros(V, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.02)
        for _ in range(steps):
            x, y = batch(B, data_gen)
            if sampled:
                loss = kc_kernels.sampled_softmax_loss(x, w, b, y, num_sampled=256, generator=sample_gen,
                                                       backend="cpu")
            else:
                loss = torch.nn.functional.cross_entropy(x @ w.t() + b, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return ((x_test @ w.t() + b).argmax(dim=1) == y_test).float().mean().item()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ops are small: on a busy machine thread barriers cost more than they give
    try:
        full, sampled = train(False), train(True)
    finally:
        torch.set_num_threads(threads)
    assert full > 0.6, f"the full-softmax baseline did not learn ({full:.3f})"
    assert sampled > full - 0.03, f"sampled {sampled:.3f} vs full {full:.3f}"


def test_benchmark_file_runs_at_a_tiny_shape():
    """The benchmark (pytest-benchmark, untimed here) still runs; a broken benchmark is noticed early."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                          os.path.join(root, "benchmarks", "bench_sampled_softmax.py"),
                          "--sampled-shape", "16,8,300,32"],
                         cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_cpu_row_passes_match_torch():
    """The C++ row passes of the CPU sampled softmax against the torch expressions they replace: shift, max with
    the true logits' max, exp in place (masked -inf exactly 0), padding zeroed; then row scale and column sums."""
    from kc_kernels import _C

    g = torch.Generator().manual_seed(0)
    B, S, ld = 37, 1001, 1024
    buf = torch.randn(B, ld, generator=g) * 3
    buf[3, 17] = buf[5, 0] = -math.inf
    shift = torch.randn(ld, generator=g)
    true_max = torch.randn(B, generator=g) * 3
    ref = buf[:, :S] + shift[:S]
    ref_m = torch.maximum(ref.amax(1), true_max)
    ref_e = (ref - ref_m[:, None]).exp()
    m, total = torch.empty(B), torch.empty(B)
    _C.sampled_rows_exp(buf.data_ptr(), ld, B, S, ld - S, shift.data_ptr(), true_max.data_ptr(), m.data_ptr(),
                        total.data_ptr())
    assert torch.equal(m, ref_m)
    assert_close(buf[:, :S], ref_e, torch.float32, "exps")
    assert buf[3, 17] == 0 and buf[5, 0] == 0 and not buf[:, S:].any()
    assert_close(total, ref_e.sum(1), torch.float32, "row sums")
    scale = torch.rand(B, generator=g)
    colsum = torch.zeros(S)
    _C.sampled_rows_scale(buf.data_ptr(), ld, B, S, scale.data_ptr(), colsum.data_ptr())
    assert_close(buf[:, :S], ref_e * scale[:, None], torch.float32, "scaled")
    assert_close(colsum, (ref_e.double() * scale.double()[:, None]).sum(0), torch.float32, "column sums")
    with pytest.raises(ValueError, match="sampled_rows_exp: sizes"):
        _C.sampled_rows_exp(buf.data_ptr(), ld, B, S, ld, shift.data_ptr(), true_max.data_ptr(), m.data_ptr(),
                            total.data_ptr())
    with pytest.raises(ValueError, match="sampled_rows_scale: u and row_scale"):
        _C.sampled_rows_scale(buf.data_ptr(), ld, B, S, 0, 0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_op_called_directly_masks_ids_and_labels_out_of_range(backend, reduction):
    """The custom op itself (what a compiled or exported graph runs, past the front's checks) with sampled ids and
    labels outside [0, V), some far outside: no read out of bounds, no garbage. A sampled id outside is a column of
    logit -inf, a label outside is padding (kc_kernels.reference.sampled_logits), and the loss and gradients are the
    reference's with those masks."""
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton not installed")
    B, H, V, S, T = 6, 13, 50, 9, 2
    x, w, b, labels, (ids, true_exp, samp_exp) = make_sampled_problem(B, H, V, S, T, dtype=torch.float32, seed=3,
                                                                      device=DEVICE)
    ids = ids.clone()
    ids[1], ids[4], ids[6] = V, -3, V + 10 ** 8
    labels = labels.clone()
    labels[2, 1], labels[3, 0] = V + 7, 10 ** 9  # rows 2 and 3 keep one valid label each
    loss, dx, dw, db = torch.ops.kc_kernels.sampled_softmax(x.detach(), w.detach(), b.detach(), labels, ids, true_exp,
                                                            samp_exp, None, "all", True, reduction, backend, 7)
    ref = reference.sampled_softmax_loss(x, w, b, labels, sampled=(ids, true_exp, samp_exp), reduction=reduction)
    assert torch.isfinite(loss).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    assert_close(loss, ref.detach(), torch.float32)
    if reduction == "none":
        assert dx.numel() == 0  # gradients wait for the backward op there
        return
    rx, rw, rb = torch.autograd.grad(ref, [x, w, b])
    for got, want in ((dx, rx), (dw, rw), (db, rb)):
        assert_close(got, want, torch.float32)
