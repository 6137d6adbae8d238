"""kc_kernels as a PyTorch citizen: torch.compile without graph breaks, torch.export, autocast, module state."""
import pytest
import torch
from torch import nn

import kc_kernels

B, H, V, K = 8, 16, 300, 5
SEGMENTS = [0, 100, 300]


class DistilledHead(nn.Module):
    """A body, then the output layer fused with the loss: the model of a distillation training step."""

    def __init__(self, backend: str, mode: str = "softmax", reduction: str = "mean"):
        super().__init__()
        self.body = nn.Linear(12, H)
        self.head = nn.Linear(H, V)
        self.loss = kc_kernels.LinearSoftTargetLoss(mode=mode, segments=SEGMENTS, reduction=reduction,
                                                    backend=backend)

    def forward(self, inp: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(inp))
        return self.loss(h, self.head.weight, self.head.bias, target_index=idx, target_value=val)


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 12, generator=g), torch.randint(0, V, (B, K), generator=g), torch.rand(B, K, generator=g)


def _step(model, fn, batch):
    """Loss and parameter gradients of one training step (the loss times 3: the backward scales the gradients)."""
    model.zero_grad()
    loss = fn(*batch)
    (3.0 * loss.sum()).backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("backend,reduction", [("cpu", "mean"), ("cpu", "none"), ("auto", "sum")])
def test_fullgraph_compile_matches_eager(backend, reduction):
    torch.manual_seed(0)
    model = DistilledHead(backend, reduction=reduction)
    batch = _batch()
    eager = _step(model, model, batch)
    explained = torch._dynamo.explain(model)(*batch)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = _step(model, compiled, batch)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_op_is_one_custom_op_node():
    model = DistilledHead("cpu")
    gm = torch.export.export(model, _batch()).graph_module
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "kc_kernels.chunked_soft_target.default" in targets


def test_export_runs_like_eager():
    torch.manual_seed(0)
    model = DistilledHead("cpu")
    batch = _batch()
    with torch.no_grad():
        exported = torch.export.export(model, batch)
        torch.testing.assert_close(exported.module()(*batch), model(*batch))


def test_logits_op_compiles_fullgraph():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, V, generator=g, requires_grad=True)
    teacher = torch.randn(B, V, generator=g)

    def f(z, t):
        return kc_kernels.soft_target_loss(z, teacher_logits=t, mode="softmax", segments=SEGMENTS, backend="cpu")

    eager = f(logits, teacher)
    (de,) = torch.autograd.grad(eager, logits)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(logits, teacher)
    (dc,) = torch.autograd.grad(compiled, logits)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(dc, de)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_autocast_casts_like_linear_and_keeps_fp32_loss(backend):
    torch.manual_seed(0)
    lin = nn.Linear(H, V)
    x = torch.randn(B, H, requires_grad=True)
    _, idx, val = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kc_kernels.linear_soft_target_loss(x, lin.weight, lin.bias, target_index=idx, target_value=val,
                                                  mode="softmax", backend=backend)
        ref_logits = lin(x)
    assert ref_logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    expected = kc_kernels.linear_soft_target_loss(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16(),
                                                  target_index=idx, target_value=val, mode="softmax",
                                                  backend=backend)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert lin.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_autocast_sampled_softmax_keeps_fp32_loss():
    lin = nn.Linear(H, V)
    x = torch.randn(B, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kc_kernels.sampled_softmax_loss(x, lin.weight, lin.bias, torch.arange(B), num_sampled=20,
                                               generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32


def test_loss_module_state_dict_round_trip_and_to():
    src = kc_kernels.LinearSoftTargetLoss(mode="softmax", segments=SEGMENTS)
    state = src.state_dict()
    assert torch.equal(state["segments"], torch.tensor(SEGMENTS))
    dst = kc_kernels.LinearSoftTargetLoss(mode="softmax", segments=[0, V])  # another layout, another length
    dst.load_state_dict(state)
    assert dst.segments.tolist() == SEGMENTS
    x, w = torch.randn(B, H), torch.randn(V, H)
    _, idx, val = _batch()
    torch.testing.assert_close(dst(x, w, target_index=idx, target_value=val),
                               src(x, w, target_index=idx, target_value=val))
    moved = dst.to("meta")
    assert moved.segments.device.type == "meta"
    assert dst.to(torch.float64).segments.dtype == torch.long  # offsets stay integers


def test_loss_module_sees_in_place_layout_change():
    mod = kc_kernels.LinearSoftTargetLoss(mode="softmax", segments=SEGMENTS)
    x, w = torch.randn(B, H), torch.randn(V, H)
    _, idx, val = _batch()
    mod.segments.copy_(torch.tensor([0, 200, V]))
    expected = kc_kernels.linear_soft_target_loss(x, w, target_index=idx, target_value=val, mode="softmax",
                                                  segments=[0, 200, V])
    torch.testing.assert_close(mod(x, w, target_index=idx, target_value=val), expected)


def test_sampled_softmax_module_buffers():
    mod = kc_kernels.SampledSoftmaxLoss(5, sampler="unigram", class_counts=torch.ones(V), seed=0)
    assert list(mod.state_dict()) == ["class_counts"]


def test_cpu_backend_refuses_tensors_on_another_device():
    x, w = torch.empty(B, H, device="meta"), torch.empty(V, H, device="meta")
    idx, val = torch.zeros(B, K, dtype=torch.long, device="meta"), torch.empty(B, K, device="meta")
    with pytest.raises(ValueError, match="^x: the cpu backend takes CPU tensors"):
        kc_kernels.linear_soft_target_loss(x, w, target_index=idx, target_value=val, backend="cpu")


def test_cpu_params_struct_checks_required_fields():
    from kc_kernels import _C

    params = _C.SoftTargetChunkParams()
    params.npieces = params.num_segments = 1
    params.phases = _C.PHASES["FINAL"]
    with pytest.raises(ValueError, match="piece_lo is required"):
        _C.soft_target_chunk(params)


class SampledHead(nn.Module):
    """A body, then an output layer trained with sampled softmax on fixed samples (no host-side drawing)."""

    def __init__(self, reduction: str = "mean", backend: str = "cpu"):
        super().__init__()
        self.body = nn.Linear(12, H)
        self.head = nn.Linear(H, V)
        self.reduction, self.backend = reduction, backend

    def forward(self, inp, labels, ids, true_expected, sampled_expected, sample_weight):
        h = torch.tanh(self.body(inp))
        return kc_kernels.sampled_softmax_loss(h, self.head.weight, self.head.bias, labels,
                                               sampled=(ids, true_expected, sampled_expected),
                                               sample_weight=sample_weight, reduction=self.reduction,
                                               backend=self.backend)


def _sampled_batch():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, V, (B, 2), generator=g)
    labels[0, 1] = -1
    ids = torch.randperm(V, generator=g)[:40]
    ids[:2] = labels[1]  # accidental hits
    return (torch.randn(B, 12, generator=g), labels, ids, torch.rand(B, 2, generator=g) + 0.1,
            torch.rand(40, generator=g) + 0.1, torch.rand(B, generator=g) + 0.5)


@pytest.mark.parametrize("backend,reduction", [("cpu", "mean"), ("cpu", "none"), ("auto", "sum")])
def test_sampled_softmax_fullgraph_compile_matches_eager(backend, reduction):
    torch.manual_seed(0)
    model = SampledHead(reduction, backend)
    batch = _sampled_batch()
    eager = _step(model, model, batch)
    explained = torch._dynamo.explain(model)(*batch)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = _step(model, compiled, batch)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sampled_softmax_export_is_one_op_and_runs_like_eager():
    torch.manual_seed(0)
    model = SampledHead()
    batch = _sampled_batch()
    with torch.no_grad():
        exported = torch.export.export(model, batch)
        targets = [str(n.target) for n in exported.graph_module.graph.nodes if n.op == "call_function"]
        assert "kc_kernels.sampled_softmax.default" in targets
        torch.testing.assert_close(exported.module()(*batch), model(*batch))
    gm = torch.export.export(model, batch).graph_module  # with gradients: the op also makes them
    assert "kc_kernels.sampled_softmax.default" in [str(n.target) for n in gm.graph.nodes]


def _opcheck(op, args):
    result = torch.library.opcheck(op, args)
    failed = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not failed, failed


@pytest.mark.parametrize("backend,budget", [("cpu", 0), ("cpu", 4 * 6 * 256), ("triton", 0)],
                         ids=["cpu", "cpu-row-blocks", "triton"])
@pytest.mark.parametrize("reduction,needs", [("mean", 0b1111), ("none", 0b0101), ("sum", 0)])
def test_opcheck_chunked_soft_target(backend, budget, reduction, needs):
    """torch.library.opcheck on kc_kernels::chunked_soft_target and its backward op: schema, fake implementation,
    autograd registration and AOT dispatch, with a bias, a per-segment scale and sparse targets (a budget below
    one segment walks it in row blocks)."""
    if not kc_kernels.backends()[backend]:
        pytest.skip(f"{backend} unavailable")
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(6, 5, generator=g), torch.randn(700, 5, generator=g), torch.randn(700, generator=g)
    scale = torch.rand(2, generator=g) + 0.5
    for t in (x, w, b, scale):
        t.requires_grad_(bool(needs))
    idx, val = torch.randint(-1, 700, (6, 3), generator=g), torch.rand(6, 3, generator=g)
    args = (x, w, b, scale, idx, val, None, None, None, None, None, None, [0, 300, 700], "softmax", reduction, 1.5,
            [0.5, 0.0, 0.0, 0.0], backend, budget, needs)
    _opcheck(torch.ops.kc_kernels.chunked_soft_target.default, args)
    grad = torch.ones(6) if reduction == "none" else torch.tensor(1.0)
    _opcheck(torch.ops.kc_kernels.chunked_soft_target_backward.default,
             (grad,) + tuple(t.detach() for t in (x, w, b, scale)) + args[4:-1] + (needs or 0b1111,))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_sampled_softmax(backend, reduction):
    if not kc_kernels.backends()[backend]:
        pytest.skip(f"{backend} unavailable")
    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(5, 6, generator=g).requires_grad_(), torch.randn(40, 6, generator=g).requires_grad_(),
               torch.randn(40, generator=g).requires_grad_())
    labels = torch.randint(0, 40, (5, 2), generator=g)
    ids = torch.tensor([3, 7, 11, 19, 23, 31])
    true_exp, samp_exp = torch.rand(5, 2, generator=g) + 0.1, torch.rand(6, generator=g) + 0.1
    schema = torch.ops.kc_kernels.sampled_softmax.default._schema
    options = [a.name for a in schema.arguments][8:]
    hits = "all" if options[0] == "accidental_hits" else True  # the accidental-hit option of this schema
    args = (x, w, b, labels, ids, true_exp, samp_exp, None, hits, True, reduction, backend, 0b111)
    _opcheck(torch.ops.kc_kernels.sampled_softmax.default, args)
    grad = torch.ones(5) if reduction == "none" else torch.tensor(1.0)
    _opcheck(torch.ops.kc_kernels.sampled_softmax_backward.default,
             (grad,) + tuple(t.detach() for t in (x, w, b)) + args[3:])


SEGMENTS_TENSOR = torch.tensor(SEGMENTS)


class SegmentsAsTensor(nn.Module):
    """A head whose loss takes its segment layout as a list, a module-level CPU tensor or a registered buffer."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.head = nn.Linear(H, V)
        self.register_buffer("layout", torch.tensor(SEGMENTS))

    def forward(self, h: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        seg = {"list": SEGMENTS, "tensor": SEGMENTS_TENSOR, "buffer": self.layout}[self.form]
        return kc_kernels.linear_soft_target_loss(h, self.head.weight, self.head.bias, target_index=idx,
                                                  target_value=val, mode="softmax", segments=seg, backend="cpu")


@pytest.mark.parametrize("form", ["list", "tensor", "buffer"])
def test_segments_as_a_tensor_compile_into_one_graph_and_equal_eager(form):
    """A segments tensor is handed to the custom op, which reads its offsets when it runs: tracing never needs
    their values, so no graph break (aten._local_scalar_dense) and fullgraph=True compiles."""
    torch.manual_seed(0)
    model = SegmentsAsTensor(form)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(B, H, generator=g, requires_grad=True)
    batch = (h, torch.randint(0, V, (B, K), generator=g), torch.rand(B, K, generator=g))
    eager = _step(model, model, batch) + [h.grad.clone()]
    h.grad = None
    explained = torch._dynamo.explain(model)(*batch)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = _step(model, compiled, batch) + [h.grad.clone()]
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        exported = torch.export.export(model, batch)
        nodes = [str(n.target) for n in exported.graph_module.graph.nodes if n.op == "call_function"]
        assert nodes.count("kc_kernels.chunked_soft_target.default") == 1
        torch.testing.assert_close(exported.module()(*batch), model(*batch))


def test_a_bad_segments_tensor_in_a_compiled_graph_is_refused_when_the_op_runs():
    model = SegmentsAsTensor("buffer")
    model.layout.copy_(torch.tensor([0, 200, 100]))  # not increasing: refused when the op reads the offsets
    g = torch.Generator().manual_seed(4)
    batch = (torch.randn(B, H, generator=g), torch.randint(0, V, (B, K), generator=g), torch.rand(B, K, generator=g))
    with pytest.raises(Exception, match="segments: offsets must be strictly increasing"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(*batch)
