"""Drawing sampled-softmax candidates inside the graph: kc_kernels.PhiloxGenerator and samplers.draw_in_graph.

The in-graph draw must have the host sampler's distribution and expected counts (compared statistically, with
fixed seeds and tolerances from the number of draws), and a compiled training step that draws with it must be one
graph with no break that computes what eager computes.
"""
import math

import pytest
import torch

import kc_kernels
from kc_kernels import samplers
from tests.helpers import assert_close

V, S = 30, 8  # small enough for thousands of draws, large enough for repeats and a long unique loop
COUNTS = (torch.arange(V) % 7).double() * 3.0  # unigram: classes 0, 7, 14, 21, 28 can never be drawn
Z = 4.5  # |z| bound of every comparison below: about 7e-6 two-sided per comparison under the same distribution


def test_philox_known_answers():
    """Random123's known-answer vectors of Philox-4x32-10."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, want in cases:
        words = samplers.philox4x32(tuple(torch.tensor(c) for c in counter), tuple(torch.tensor(k) for k in key))
        assert [int(w) for w in words] == list(want)


def test_generator_is_one_stream_owned_by_its_state():
    g = kc_kernels.PhiloxGenerator(11)
    a, b = g.uniform(6), g.uniform(4)
    assert g.state.tolist() == [11, 5]  # two uniforms a block
    whole = kc_kernels.PhiloxGenerator(11).uniform(10)
    assert torch.equal(torch.cat([a, b]), whole)
    assert bool(((whole > 0) & (whole < 1)).all())
    g.state[1] = 3  # the caller owns the state: rewinding it repeats the draws
    assert torch.equal(g.uniform(4), whole[6:])
    assert not torch.equal(kc_kernels.PhiloxGenerator(12).uniform(10), whole)
    with pytest.raises(ValueError, match="seed"):
        kc_kernels.PhiloxGenerator(-1)


def test_uniforms_are_uniform():
    """Kolmogorov-Smirnov distance of 40,000 uniforms to U(0, 1), against its 1e-4 critical value."""
    u = torch.sort(kc_kernels.PhiloxGenerator(5).uniform(40000)).values
    n = len(u)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    d = torch.maximum(grid - u, u - (grid - 1 / n)).max().item()
    assert d < math.sqrt(-0.5 * math.log(1e-4 / 2) / n), d


def _host_draws(sampler, unique, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, tries = [], []
    for _ in range(n):
        c = samplers.sample_candidates(sampler, S, V, unique=unique, class_counts=COUNTS, generator=g)
        ids.append(c.ids)
        tries.append(float(c.num_tries))
    return torch.stack(ids), torch.tensor(tries, dtype=torch.float64)


def _graph_draws(sampler, unique, n, seed=0):
    """n draws of draw_in_graph at once: consecutive draws read consecutive blocks of one stream, so these are the
    draws that n calls would make."""
    g = kc_kernels.PhiloxGenerator(seed)
    u = g.uniform(n * samplers.uniforms_needed(S, V, unique)).view(n, -1)
    probs = samplers.class_probabilities(sampler, V, class_counts=COUNTS) if sampler == "unigram" else None
    return samplers.candidates_from_uniforms(sampler, S, V, u, unique=unique, probs=probs)


def _assert_same_mean(a: torch.Tensor, b: torch.Tensor, what: str):
    """Per column: the means of two samples agree within Z standard errors (two-sample z, pooled variance)."""
    a, b = a.double(), b.double()
    pooled = torch.cat([a, b]).var(dim=0, unbiased=True)
    se = torch.sqrt(pooled * (1 / len(a) + 1 / len(b))).clamp_min(1e-12)
    z = (a.mean(dim=0) - b.mean(dim=0)) / se
    assert bool((z.abs() <= Z).all()), f"{what}: max |z| {z.abs().max().item():.2f} at {int(z.abs().argmax())}"


@pytest.mark.parametrize("unique", [False, True])
@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_in_graph_draw_has_the_host_distribution_and_expected_counts(sampler, unique):
    """2,000 draws of each sampler: per class, how often it is drawn (and, for unique sampling, how often it comes
    first, which checks the order), the number of tries and every class's expected count agree between the host
    loop and the in-graph draw; with replacement the frequencies also match num_sampled * p."""
    n = 2000
    host_ids, host_tries = _host_draws(sampler, unique, n)
    graph_ids, graph_tries = _graph_draws(sampler, unique, n)
    assert graph_ids.shape == (n, S) and graph_ids.dtype == torch.int64

    def per_class(ids):  # [n, V] how many times each class is among a draw's ids
        ones = torch.ones_like(ids, dtype=torch.float64)
        return torch.zeros(len(ids), V, dtype=torch.float64).scatter_add_(1, ids, ones)

    host_counts, graph_counts = per_class(host_ids), per_class(graph_ids)
    _assert_same_mean(host_counts, graph_counts, "draws per class")
    p = samplers.class_probabilities(sampler, V, class_counts=COUNTS)
    if sampler == "unigram":
        assert graph_counts[:, p == 0].sum() == 0  # a class of count 0 is never drawn
    if unique:
        assert bool((graph_counts <= 1).all())  # distinct ids
        _assert_same_mean(per_class(host_ids[:, :1]), per_class(graph_ids[:, :1]), "first id")
        _assert_same_mean(host_tries[:, None], graph_tries[:, None], "num_tries")
        assert bool((graph_tries >= S).all()) and bool((graph_tries == graph_tries.floor()).all())
    else:
        assert bool((graph_tries == S).all())
        z = (graph_counts.mean(dim=0) - S * p) / torch.sqrt(S * p * (1 - p) / n).clamp_min(1e-12)
        assert bool((z.abs() <= Z).all()), z.abs().max()

    # expected counts of every class, as the op subtracts them, averaged over the draws
    classes = torch.arange(V)

    table = p if sampler == "unigram" else None

    def expected(tries):  # [n, V]: a column of tries broadcasts against the classes
        counts = samplers.Candidates(host_ids[0], tries, table, sampler, V).expected_count(classes, S, unique)
        return counts.expand(n, V)

    host_exp, graph_exp = expected(host_tries[:, None]), expected(graph_tries[:, None])
    assert torch.allclose(host_exp[0], expected(int(host_tries[0])))  # the host's int num_tries: the same counts
    _assert_same_mean(host_exp, graph_exp, "expected counts")
    if not unique:
        assert torch.allclose(graph_exp[0], S * p)


def test_draw_in_graph_expected_counts_follow_tensorflow():
    """The counts draw_in_graph returns are TensorFlow's formulas of its own num_tries."""
    g = kc_kernels.PhiloxGenerator(4)
    for unique in (False, True):
        cand = samplers.draw_in_graph("log_uniform", S, V, g, unique=unique)
        p = samplers.probability("log_uniform", cand.ids, V)
        tries = float(cand.num_tries)
        want = S * p if not unique or tries == S else 1 - (1 - p) ** tries
        assert torch.allclose(cand.expected_count(cand.ids, S, unique), want)
        assert len(torch.unique(cand.ids)) == S or not unique


# ------------------------------------------------------------------------------------------ a compiled training step

class Head(torch.nn.Module):
    """A model whose loss draws its candidates in the graph from the generator it owns."""

    def __init__(self, sampler, unique, seed=7):
        super().__init__()
        self.body = torch.nn.Linear(12, 16)
        self.head = torch.nn.Linear(16, 200)
        self.sampler, self.unique = sampler, unique
        self.register_buffer("class_counts", torch.arange(200).double() % 5 + 1)
        self.generator = kc_kernels.PhiloxGenerator(seed)

    def forward(self, inp, labels):
        h = torch.tanh(self.body(inp))
        return kc_kernels.sampled_softmax_loss(h, self.head.weight, self.head.bias, labels, num_sampled=24,
                                               sampler=self.sampler, class_counts=self.class_counts,
                                               unique=self.unique, generator=self.generator, backend="cpu")


def _train_step(model, fn, batch):
    model.zero_grad()
    loss = fn(*batch)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("sampler,unique", [("log_uniform", True), ("uniform", False), ("unigram", True)])
def test_compiled_step_draws_in_graph_without_breaks(sampler, unique):
    torch.manual_seed(0)
    model = Head(sampler, unique)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(10, 12, generator=g), torch.randint(0, 200, (10, 2), generator=g))
    explained = torch._dynamo.explain(model)(*batch)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for step in range(2):  # each step draws anew: the compiled graph advances the caller's state
        start = model.generator.state.clone()
        got = _train_step(model, compiled, batch)
        after = model.generator.state.clone()
        assert after[1] > start[1]
        model.generator.state.copy_(start)
        eager = _train_step(model, model, batch)
        assert torch.equal(model.generator.state, after)
        for a, e in zip(got, eager):
            assert_close(a, e, torch.float32)
    assert not torch.equal(got[0], _train_step(model, compiled, batch)[0])


def test_generator_on_another_device_is_refused():
    x, w = torch.randn(3, 4), torch.randn(10, 4)
    g = kc_kernels.PhiloxGenerator(0, device="meta")
    with pytest.raises(ValueError, match="generator"):
        kc_kernels.sampled_softmax_loss(x, w, None, torch.tensor([1, 2, 3]), num_sampled=4, generator=g)


def test_module_draws_in_graph_from_its_buffer():
    """SampledSoftmaxLoss(in_graph=True): the Philox state is a buffer (state_dict, .to()) that each call
    advances; a compiled call is one graph and draws what eager draws from the same state."""
    torch.manual_seed(0)
    loss_fn = kc_kernels.SampledSoftmaxLoss(16, seed=3, in_graph=True, unique=False, accidental_hits="tensorflow",
                                            backend="cpu")
    assert "sampler_state" in loss_fn.state_dict()
    x, w, b = torch.randn(6, 8), torch.randn(100, 8, requires_grad=True), torch.randn(100)
    labels = torch.randint(0, 100, (6,))
    start = loss_fn.sampler_state.clone()
    eager = loss_fn(x, w, b, labels)
    assert loss_fn.sampler_state[1] > start[1]
    explained = torch._dynamo.explain(loss_fn)(x, w, b, labels)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    loss_fn.sampler_state.copy_(start)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, w, b, labels), eager, torch.float32)


@pytest.mark.parametrize("philox", [False, True])
def test_unigram_counts_checked_for_both_draws(monkeypatch, philox):
    x, w, labels = torch.randn(3, 4), torch.randn(10, 4), torch.tensor([1, 2, 3])
    counts = torch.zeros(10)
    counts[:3] = 1.0  # three classes can be drawn: too few for 4 unique candidates

    def call():
        gen = kc_kernels.PhiloxGenerator(0) if philox else torch.Generator().manual_seed(0)
        return kc_kernels.sampled_softmax_loss(x, w, None, labels, num_sampled=4, sampler="unigram",
                                               class_counts=counts, generator=gen)

    with pytest.raises(ValueError, match="class_counts.*non-zero"):
        call()
    if philox:  # the in-graph draw follows the value-check mode: a device-side assertion under "async"
        monkeypatch.setenv("KC_CHECK_VALUES", "async")
        with pytest.raises(RuntimeError, match="class_counts"):
            call()


@pytest.mark.compile_check  # inductor compiles C++ for about a minute: run with -m compile_check
def test_inductor_compiled_step_draws_like_eager():
    torch.manual_seed(0)
    model = Head("log_uniform", True)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(10, 12, generator=g), torch.randint(0, 200, (10, 2), generator=g))
    start = model.generator.state.clone()
    got = _train_step(model, torch.compile(model, fullgraph=True), batch)
    model.generator.state.copy_(start)
    for a, e in zip(got, _train_step(model, model, batch)):
        assert_close(a, e, torch.float32)
