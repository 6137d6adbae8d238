"""The cpu backend of (linear_)soft_target_loss against the float64 reference, forward and every gradient."""
import itertools
import math

import pytest
import torch

import kc_kernels
from kc_kernels import host_buffers
from kc_kernels.layout import plan_chunks
from tests.helpers import assert_close, grads, make_problem

DIFF = ("x", "weight", "bias", "scale")


def _run(p, backend, **kw):
    x, w, b = p["x"], p["weight"], p["bias"]
    rest = {k: v for k, v in p.items() if k not in ("x", "weight", "bias")}
    return kc_kernels.linear_soft_target_loss(x, w, b, backend=backend, **rest, **kw)


def _round_to_bf16(p64):
    """Round the float64 inputs to bf16 values in place, so that the bf16 run and the reference see the same numbers."""
    for k in DIFF:
        if p64.get(k) is not None:
            p64[k] = p64[k].to(torch.bfloat16).double()


def _check_against_reference(p64, dtype, *, memory_budget=None, **kw):
    """Run the reference in float64 and the cpu backend in ``dtype`` on the same values; compare all outputs."""
    pd = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k in DIFF + ("sample_weight",)
              else v) for k, v in p64.items()}
    for d in (p64, pd):
        for k in DIFF:
            if d.get(k) is not None:
                d[k].requires_grad_(True)
    ref = _run(p64, "reference", **kw)
    out = _run(pd, "cpu", memory_budget=memory_budget, **kw)
    scale = max(1.0, ref.detach().abs().max().item())
    assert_close(out, ref, dtype, "loss")
    for name, a, e in zip(DIFF, grads(out, [pd.get(k) for k in DIFF]), grads(ref, [p64.get(k) for k in DIFF])):
        if e is not None:
            assert a.dtype == pd[name].dtype, f"d{name} dtype {a.dtype}"
            assert_close(a, e, dtype, f"d{name}", scale=scale)


TABLE = list(itertools.product(("sigmoid", "softmax"), ("sparse", "dense"), ("flat", "segments", "grouped"),
                               (None, "segment", "class")))


@pytest.mark.parametrize("mode,target_form,layout,scale_kind", TABLE)
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "split-segments"])
def test_cpu_matches_reference(mode, target_form, layout, scale_kind, chunked):
    i = TABLE.index((mode, target_form, layout, scale_kind))
    gen = torch.Generator().manual_seed(500 + i + 1000 * chunked)
    B, V = (5, 1, 7)[i % 3], 1000 if chunked else 37
    p = make_problem(B, 8, V, G=None if layout == "flat" else 3, grouped=layout == "grouped", gen=gen,
                     scale_kind=scale_kind, target_form=target_form, sample_weight=i % 2 == 0, K=5)
    # a budget of 300 columns: V=1000 is walked in several chunks and every segment is split across chunks
    budget = 4 * B * 300 if chunked else None
    _check_against_reference(p, torch.float32, memory_budget=budget, mode=mode, temperature=(1.0, 1.7, 0.6)[i % 3],
                             reduction=("mean", "sum", "none")[i % 3])


@pytest.mark.parametrize("case", ["V=1", "segments-of-size-1", "many-small-segments", "B=1", "duplicates",
                                  "all-padding", "zero-target-mass", "huge-logits"])
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_cpu_odd_cases(case, mode, gen):
    kw = dict(mode=mode, reduction="sum")
    if case == "V=1":
        p = make_problem(4, 6, 1, gen=gen, K=2)
    elif case == "segments-of-size-1":
        p = make_problem(3, 5, 6, G=6, gen=gen, scale_kind="segment")
    elif case == "many-small-segments":
        p = make_problem(3, 5, 700, G=90, gen=gen, scale_kind="class", K=9)
        p["segments"] = torch.tensor(sorted(set([0, 700] + torch.randperm(699, generator=gen)[:89].add(1).tolist())))
        p["scale"] = torch.rand(700, generator=gen, dtype=torch.float64) + 0.5
        kw["memory_budget"] = 4 * 3 * 256
    elif case == "B=1":
        p = make_problem(1, 7, 300, G=2, grouped=True, gen=gen, scale_kind="segment", K=3)
        kw["memory_budget"] = 4 * 256
    elif case == "duplicates":
        p = make_problem(3, 4, 20, gen=gen, K=6)
        p["target_index"] = torch.tensor([[3, 3, 3, -1, 7, 7], [0, 0, 19, 19, -1, -1], [5, 6, 5, 6, 5, 6]])
    elif case == "all-padding":
        p = make_problem(3, 4, 20, G=4, gen=gen, K=3, scale_kind="segment")
        p["target_index"] = torch.full((3, 3), -1)
    elif case == "zero-target-mass":
        p = make_problem(3, 4, 20, G=2, gen=gen, K=3)
        p["target_value"] = torch.zeros(3, 3, dtype=torch.float64)
    else:  # logits near +-1e4: softplus, sigmoid and the log-sum-exp must stay finite and exact
        p = make_problem(4, 6, 50, G=2, gen=gen, K=4, logit_scale=4e3)
    _check_against_reference(p, torch.float32, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_cpu_half_inputs_accumulate_in_fp32(dtype, mode, gen):
    p = make_problem(6, 16, 300, G=3, gen=gen, scale_kind="segment", K=4)
    # round the inputs to the half dtype first so that both sides see the same values
    for k in DIFF:
        if p.get(k) is not None:
            p[k] = p[k].to(dtype).double()
    _check_against_reference(p, dtype, mode=mode, memory_budget=4 * 6 * 256)


def test_cpu_soft_target_loss_on_given_logits(gen):
    B, V = 5, 400
    logits = torch.randn(B, V, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(B, V, generator=gen, dtype=torch.float64)
    scale = torch.rand(4, generator=gen, dtype=torch.float64) + 1
    segs = torch.tensor([0, 50, 51, 300, 400])
    for mode in ("sigmoid", "softmax"):
        l64 = logits.clone().requires_grad_()
        l32 = logits.float().requires_grad_()
        s64, s32 = scale.clone().requires_grad_(), scale.float().requires_grad_()
        kw = dict(teacher_logits=teacher, mode=mode, segments=segs, temperature=2.0)
        ref = kc_kernels.soft_target_loss(l64, scale=s64, backend="reference", **kw)
        out = kc_kernels.soft_target_loss(l32, scale=s32, backend="cpu", memory_budget=4 * B * 256,
                                          **{**kw, "teacher_logits": teacher.float()})
        assert_close(out, ref, torch.float32, "loss")
        for a, e, n in zip(grads(out, [l32, s32]), grads(ref, [l64, s64]), ("dlogits", "dscale")):
            assert_close(a, e, torch.float32, n)


def test_cpu_is_what_auto_picks_on_cpu(gen):
    from kc_kernels import dispatch

    name, _ = dispatch.resolve("linear_soft_target_loss", "auto", torch.device("cpu"))
    assert name == "cpu"


def test_cpu_loss_only_forward_without_grad(gen):
    p = make_problem(4, 6, 90, G=3, gen=gen, scale_kind="class", dtype=torch.float32)
    with torch.no_grad():
        out = _run(p, "cpu", mode="softmax", memory_budget=4 * 4 * 256)
    ref = _run({k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in p.items()},
               "reference", mode="softmax")
    assert_close(out, ref, torch.float32, "loss")


def test_chunk_plan_keeps_segments_whole_or_splits_them():
    steps = plan_chunks([0, 10, 20, 600, 610], capacity=256, grouped=False)
    assert [(s[0].lo, s[0].hi, s[0].whole) for s in steps][:1] == [(0, 20, True)]
    split = steps[1]
    assert [(c.lo, c.hi) for c in split] == [(20, 276), (276, 532), (532, 600)] and not split[0].whole
    assert (steps[2][0].lo, steps[2][0].hi) == (600, 610)
    grouped = plan_chunks([0, 10, 20, 30], capacity=256, grouped=True)
    assert [(s[0].lo, s[0].hi) for s in grouped] == [(0, 10), (10, 20), (20, 30)]


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_no_batch_by_classes_allocation_at_100k_classes(mode):
    """At B=256, V=100,000 the op never allocates anything near B*V elements (tracked by torch's CPU profiler);
    in softmax mode the one 100K-class segment is walked in row blocks."""
    B, H, V, K = 256, 32, 100_000, 100
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, H, generator=g, requires_grad=True)
    w = (torch.randn(V, H, generator=g) * 0.1).requires_grad_()
    b = torch.zeros(V, requires_grad=True)
    idx = torch.randint(0, V, (B, K), generator=g)
    val = torch.rand(B, K, generator=g)
    budget = 8 << 20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = kc_kernels.linear_soft_target_loss(x, w, b, target_index=idx, target_value=val, backend="cpu",
                                                  memory_budget=budget, mode=mode)
        loss.backward()
    largest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    bv_bytes = 4 * B * V
    # the largest (net) allocation of one event is the weight gradient (V*H), with the chunk buffer (at most the
    # budget) that the op keeps for the next call: far below a [B, V] buffer
    assert largest <= (4 * V * H + budget) * 1.05, largest
    assert largest < bv_bytes / 4, (largest, bv_bytes)
    assert torch.isfinite(loss)


def test_cpu_gradients_only_of_inputs_that_need_them(gen):
    p = make_problem(4, 6, 90, G=3, gen=gen, scale_kind="segment", dtype=torch.float32)
    x = p["x"].requires_grad_()
    rest = {k: v for k, v in p.items() if k not in ("x", "weight", "bias")}
    out = kc_kernels.linear_soft_target_loss(x, p["weight"], p["bias"], backend="cpu", **rest)
    out.backward()
    x_ref = p["x"].detach().double().requires_grad_()
    ref = kc_kernels.linear_soft_target_loss(x_ref, p["weight"].double(), p["bias"].double(), backend="reference",
                                             **{**rest, "scale": rest["scale"].double()})
    ref.backward()
    assert p["weight"].grad is None and p["bias"].grad is None
    assert_close(x.grad, x_ref.grad, torch.float32, "dx")


def test_cpu_backward_twice_and_scaled_grad_output(gen):
    p = make_problem(4, 6, 90, G=3, gen=gen, scale_kind="segment", dtype=torch.float32)
    w = p["weight"].requires_grad_()
    rest = {k: v for k, v in p.items() if k not in ("x", "weight", "bias")}
    out = kc_kernels.linear_soft_target_loss(p["x"], w, p["bias"], backend="cpu", **rest)
    (3.0 * out).backward(retain_graph=True)
    first = w.grad.clone()
    w.grad = None
    (0.5 * out).backward()  # the saved gradients were used up: this one sweeps again
    assert_close(w.grad * 6.0, first, torch.float32, "dW")


@pytest.mark.parametrize("mode,target_form,layout,scale_kind,reduction", [
    ("softmax", "sparse", "flat", None, "mean"),
    ("softmax", "dense", "segments", "class", "none"),
    ("sigmoid", "dense", "grouped", "segment", "sum"),
    ("sigmoid", "sparse", "segments", "class", "none"),
])
def test_cpu_long_segments_walked_in_row_blocks(mode, target_form, layout, scale_kind, reduction, gen):
    """B=70 rows and segments several times the chunk: each long segment is walked in blocks of 32 rows."""
    B = 70
    p = make_problem(B, 8, 1000, G=None if layout == "flat" else 2, grouped=layout == "grouped", gen=gen,
                     scale_kind=scale_kind, target_form=target_form, sample_weight=True, K=5)
    if target_form == "dense":
        p["teacher_logits"] = p["teacher_logits"].float()  # read in place
        if layout == "grouped":
            p["teacher_logits"] = p["teacher_logits"].half()  # converted per row block
    _check_against_reference(p, torch.float32, memory_budget=4 * B * 256, mode=mode, temperature=1.3,
                             reduction=reduction)


def test_cpu_half_weights_with_long_segments_in_row_blocks(gen):
    p = make_problem(70, 8, 1000, gen=gen, K=4, sample_weight=True)
    _round_to_bf16(p)
    _check_against_reference(p, torch.bfloat16, mode="softmax", memory_budget=4 * 70 * 256)


def test_cpu_half_scratch_padding_never_reaches_the_gradients(gen, monkeypatch):
    """Scratch rows are padded (an odd number of cache lines apart); a half-precision GEMM may read that padding
    and mask it by multiplication, so NaN bits left there by earlier users of the memory must not become NaN rows
    of dx. The driver's buffer is filled with NaN before every sweep here."""
    import kc_kernels.driver as driver

    init = driver.Sweep.__init__

    def nan_buffer(self, *a, **k):
        init(self, *a, **k)
        self.buf.fill_(float("nan"))

    monkeypatch.setattr(driver.Sweep, "__init__", nan_buffer)
    p = make_problem(70, 8, 1000, gen=gen, K=4, sample_weight=True)
    _round_to_bf16(p)
    for budget in (4 * 70 * 256, None):  # row blocks of a long segment, and whole chunks
        _check_against_reference(p, torch.bfloat16, mode="softmax", memory_budget=budget)


@pytest.mark.parametrize("mode,target_form,scale_kind,dtype", [("softmax", "dense", "segment", torch.float32),
                                                               ("sigmoid", "sparse", None, torch.float32),
                                                               ("sigmoid", "sparse", "class", torch.float32),
                                                               ("softmax", "sparse", None, torch.bfloat16)])
def test_cpu_chunks_smaller_than_the_budget(mode, target_form, scale_kind, dtype, gen, monkeypatch):
    """Column chunks capped by the epilogue's chunk_bytes while the budget is larger: a segment longer than a chunk
    is walked in row blocks over the whole budget (the scratch buffer grown once), the rest in small chunks."""
    from kc_kernels.cpu.epilogue import CpuEpilogue

    B = 37
    monkeypatch.setattr(CpuEpilogue, "chunk_bytes", 4 * B * 300)
    p = make_problem(B, 8, 1500, G=3, gen=gen, K=4, scale_kind=scale_kind, target_form=target_form,
                     sample_weight=True)
    if dtype == torch.bfloat16:
        _round_to_bf16(p)
    for budget in (4 * B * 2000, 4 * B * 700):  # every segment in one row block; several blocks
        _check_against_reference(p, dtype, mode=mode, memory_budget=budget)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax"])
def test_kept_scratch_is_reused_and_its_old_contents_never_matter(mode):
    """The host scratch kept between calls (host_buffers.take_workspace) is reused by the next call, and whatever it
    holds (here NaN everywhere) never reaches the results: the same bits as a call with a fresh buffer."""
    g = torch.Generator().manual_seed(5)
    B, H, V = 33, 16, 3001
    x = torch.randn(B, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g) * 0.1
    idx = torch.randint(0, V, (B, 4), generator=g)
    val = torch.rand(B, 4, generator=g)

    def run():
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        loss = kc_kernels.linear_soft_target_loss(xs, ws, bs, target_index=idx, target_value=val, mode=mode,
                                                  backend="cpu", memory_budget=64 << 10)
        loss.backward()
        return [loss.detach(), xs.grad, ws.grad, bs.grad]

    host_buffers._workspace.clear()
    fresh = run()
    kept = host_buffers._workspace[torch.float32]
    kept.fill_(math.nan)
    again = run()
    assert host_buffers._workspace[torch.float32].data_ptr() == kept.data_ptr()  # reused, not allocated again
    for a, e in zip(again, fresh):
        assert torch.equal(a, e)
    big = torch.empty(host_buffers.WORKSPACE_MAX_BYTES // 4 + 1)
    host_buffers.give_back_workspace(big)  # above the cap: not kept
    assert host_buffers._workspace[torch.float32].data_ptr() == kept.data_ptr()


@pytest.mark.parametrize("scaled", [False, True])
def test_sigmoid_loss_sums_100k_classes_to_float_accuracy(scaled):
    """The sigmoid loss is a sum of 100K softplus terms per row; the CPU epilogue sums them without a log per logit
    (a series for small exp(-|y|), a renormalised product for the rest). Over logits from far below zero (terms
    that a product in float would round away) to far above it, the fp32 loss stays within 2e-6 of float64, and the
    logit gradient is unaffected."""
    g = torch.Generator().manual_seed(11)
    B, V = 4, 100_000
    idx = torch.randint(0, V, (B, 5), generator=g)
    val = torch.rand(B, 5, generator=g)
    kw = dict(target_index=idx, target_value=val, mode="sigmoid", reduction="none")
    if scaled:
        kw.update(segments=torch.tensor([0, 40_000, V]), scale=torch.tensor([3.0, 50.0]))
    for shift in (-30.0, -16.0, -8.0, 0.0, 8.0):
        for spread in (0.1, 3.0):
            u = torch.randn(B, V, generator=g) * spread + shift
            got_u = u.clone().requires_grad_()
            got = kc_kernels.soft_target_loss(got_u, backend="cpu", **kw)
            got.sum().backward()
            want_u = u.double().requires_grad_()
            kw64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
            want = kc_kernels.soft_target_loss(want_u, backend="reference", **kw64)
            want.sum().backward()
            rel = ((got.double() - want).abs() / want.abs()).max().item()
            assert rel < 2e-6, (shift, spread, rel)
            grad_rel = ((got_u.grad.double() - want_u.grad).abs().max() / want_u.grad.abs().max()).item()
            assert grad_rel < 2e-6, (shift, spread, grad_rel)


def test_kept_gradient_outputs_are_reused_only_when_nothing_else_holds_them(monkeypatch):
    """A large gradient output (dW) of the last call is handed out again once the caller dropped it, so a training
    loop does not map and fault in a fresh [V, H] buffer every step; a gradient still referenced anywhere (kept by
    the user, being accumulated into, or made by a second call before one backward) never is."""
    monkeypatch.setattr(host_buffers, "KEPT_OUTPUT_MIN_BYTES", 1)
    kc_kernels.release_host_buffers()
    g = torch.Generator().manual_seed(6)
    B, H, V = 9, 16, 700
    x = torch.randn(B, H, generator=g)
    w = torch.randn(V, H, generator=g).requires_grad_()
    idx = torch.randint(0, V, (B, 3), generator=g)
    val = torch.rand(B, 3, generator=g)

    def loss():
        return kc_kernels.linear_soft_target_loss(x, w, target_index=idx, target_value=val, backend="cpu")

    loss().backward()
    first, want = w.grad.data_ptr(), w.grad.clone()
    w.grad = None
    loss().backward()
    assert w.grad.data_ptr() == first and torch.equal(w.grad, want)  # reused, same bits
    held = w.grad
    w.grad = None
    loss().backward()
    assert w.grad.data_ptr() != held.data_ptr() and torch.equal(held, want)  # a held gradient is left alone
    loss().backward()  # accumulation into the existing gradient
    torch.testing.assert_close(w.grad, 2 * want)
    w.grad = held = None
    (loss() + loss()).backward()  # two calls before one backward: two buffers
    torch.testing.assert_close(w.grad, 2 * want)
    w.grad.untyped_storage().resize_(0)  # memory taken away from under the kept tensor: not reused
    w.grad = None
    loss().backward()
    assert torch.equal(w.grad, want)

    u = (x @ w.detach().t()).requires_grad_()  # soft_target_loss keeps its [B, V] dlogits the same way
    kc_kernels.soft_target_loss(u, target_index=idx, target_value=val, backend="cpu").backward()
    first, want = u.grad.data_ptr(), u.grad.clone()
    u.grad = None
    kc_kernels.soft_target_loss(u, target_index=idx, target_value=val, backend="cpu").backward()
    assert u.grad.data_ptr() == first and torch.equal(u.grad, want)
    kc_kernels.release_host_buffers()
    assert not host_buffers._kept_outputs


def test_kept_dense_sampled_gradient_is_zeroed_again(monkeypatch):
    """The sampled softmax's dense weight gradient reuses the kept buffer of the last call, which holds that call's
    rows: only this call's sampled and true rows may be nonzero."""
    monkeypatch.setattr(host_buffers, "KEPT_OUTPUT_MIN_BYTES", 1)
    g = torch.Generator().manual_seed(8)
    B, H, V, S = 6, 8, 300, 20
    x = torch.randn(B, H, generator=g)
    w = torch.randn(V, H, generator=g).requires_grad_()
    labels = torch.randint(0, V, (B,), generator=g)
    ptrs = []
    for draw in range(3):
        ids = torch.randperm(V, generator=g)[:S]
        sampled = (ids, torch.full((B,), 0.1), torch.full((S,), 0.1))
        kc_kernels.sampled_softmax_loss(x, w, None, labels, sampled=sampled, num_sampled=S,
                                        backend="cpu").backward()
        touched = torch.zeros(V, dtype=torch.bool)
        touched[ids] = True
        touched[labels] = True
        assert not w.grad[~touched].any()
        want = torch.autograd.grad(kc_kernels.sampled_softmax_loss(x, w, None, labels, sampled=sampled,
                                                                   num_sampled=S, backend="reference"), w)[0]
        torch.testing.assert_close(w.grad, want)
        ptrs.append(w.grad.data_ptr())
        w.grad = None
    assert ptrs[1] == ptrs[0]  # the kept buffer, rows of the first draw included, was reused
    kc_kernels.release_host_buffers()


@pytest.mark.parametrize("scaled", [False, True])
def test_a_nan_logit_makes_its_row_loss_nan(scaled):
    """The sigmoid loss's renormalised product would drop a NaN factor (its exponent bits are cleared): the NaN
    reaches the row's loss through the rounding term instead, and only that row's."""
    g = torch.Generator().manual_seed(12)
    B, V = 3, 5000
    u = torch.randn(B, V, generator=g)
    u[1, 1234] = math.nan
    kw = dict(target_index=torch.randint(0, V, (B, 2), generator=g), target_value=torch.rand(B, 2, generator=g),
              mode="sigmoid", reduction="none", backend="cpu")
    if scaled:
        kw.update(segments=torch.tensor([0, 2000, V]), scale=torch.tensor([2.0, 3.0]))
    for grad in (False, True):
        loss = kc_kernels.soft_target_loss(u.clone().requires_grad_(grad), **kw)
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
