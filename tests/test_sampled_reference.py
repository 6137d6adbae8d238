"""Sampled softmax reference and samplers against brute-force definitions."""
import math

import pytest
import torch
import torch.nn.functional as F

import kc_kernels
from kc_kernels import reference, samplers
from tests.helpers import assert_close, grads


def brute_force_sampled(x, weight, bias, labels, ids, true_exp, samp_exp, remove_hits, subtract_log_q, reduction):
    B = x.shape[0]
    labels = labels if labels.dim() == 2 else labels[:, None]
    true_exp = true_exp if true_exp.dim() == 2 else true_exp[:, None]
    rows = []
    for r in range(B):
        true_ids = [int(c) for c in labels[r] if int(c) >= 0]
        logits, targets = [], []
        for t, c in enumerate(int(v) for v in labels[r]):
            if c < 0:
                continue
            v = x[r] @ weight[c] + (bias[c] if bias is not None else 0.0)
            if subtract_log_q:
                v = v - math.log(float(true_exp[r, t]))
            logits.append(v)
            targets.append(1.0 / len(true_ids))
        for s, c in enumerate(int(v) for v in ids):
            if remove_hits and c in true_ids:
                continue
            v = x[r] @ weight[c] + (bias[c] if bias is not None else 0.0)
            if subtract_log_q:
                v = v - math.log(float(samp_exp[s]))
            logits.append(v)
            targets.append(0.0)
        lse = torch.log(sum(torch.exp(v) for v in logits))
        rows.append(lse - sum(t * v for t, v in zip(targets, logits)))
    per_row = torch.stack(rows)
    return per_row if reduction == "none" else (per_row.sum() if reduction == "sum" else per_row.mean())


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("remove_hits", [False, True])
@pytest.mark.parametrize("subtract_log_q", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_sampled_reference_matches_brute_force(multi, remove_hits, subtract_log_q, reduction, gen):
    B, H, V, S = 5, 4, 23, 7
    x = torch.randn(B, H, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=gen, dtype=torch.float64, requires_grad=True)
    if multi:
        labels = torch.randint(0, V, (B, 3), generator=gen)
        labels[0, 2] = -1
        labels[1, 1:] = -1
        labels[2, 1] = labels[2, 0]  # a duplicate true label counts twice
    else:
        labels = torch.randint(0, V, (B,), generator=gen)
    ids = torch.randperm(V, generator=gen)[:S]
    ids[0] = labels.reshape(B, -1)[0, 0]  # force an accidental hit
    true_exp = torch.rand(labels.shape, generator=gen, dtype=torch.float64) + 0.1
    samp_exp = torch.rand(S, generator=gen, dtype=torch.float64) + 0.1
    kw = dict(remove_accidental_hits=remove_hits, subtract_log_q=subtract_log_q, reduction=reduction)
    ref = reference.sampled_softmax_loss(x, w, b, labels, sampled=(ids, true_exp, samp_exp), **kw)
    bf = brute_force_sampled(x, w, b, labels, ids, true_exp, samp_exp, remove_hits, subtract_log_q, reduction)
    assert_close(ref, bf, what="loss")
    for name, a, e in zip(("dx", "dweight", "dbias"), grads(ref, [x, w, b]), grads(bf, [x, w, b])):
        assert_close(a, e, what=name)


def test_sampling_every_class_is_the_full_softmax(gen):
    B, H, V = 6, 5, 17
    x = torch.randn(B, H, generator=gen, dtype=torch.float64)
    w = torch.randn(V, H, generator=gen, dtype=torch.float64)
    b = torch.randn(V, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (B,), generator=gen)
    ones = torch.ones(V, dtype=torch.float64)
    sampled = (torch.arange(V), torch.ones(B, dtype=torch.float64), ones)
    loss = kc_kernels.sampled_softmax_loss(x, w, b, labels, sampled=sampled, subtract_log_q=False)
    assert_close(loss, F.cross_entropy(x @ w.t() + b, labels), what="loss")


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_sampler_probabilities_sum_to_one(sampler):
    counts = torch.arange(1, 101).double()
    p = samplers.class_probabilities(sampler, 100, class_counts=counts, distortion=0.75)
    assert abs(p.sum().item() - 1.0) < 1e-12
    assert (p > 0).all()


def test_log_uniform_matches_tensorflow_formula():
    V = 1000
    p = samplers.class_probabilities("log_uniform", V)
    k = torch.arange(V, dtype=torch.float64)
    assert_close(p, (torch.log(k + 2) - torch.log(k + 1)) / math.log(V + 1), what="P(k)")


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_unique_sampling_gives_distinct_ids_and_counts_tries(sampler):
    g = torch.Generator().manual_seed(0)
    counts = torch.rand(500, generator=g) + 0.01
    cand = samplers.sample_candidates(sampler, 100, 500, unique=True, class_counts=counts, generator=g)
    assert len(cand.ids) == 100 and len(torch.unique(cand.ids)) == 100
    assert cand.num_tries >= 100
    assert int(cand.ids.min()) >= 0 and int(cand.ids.max()) < 500


@pytest.mark.parametrize("sampler,num_sampled,num_classes", [("log_uniform", 300, 1000), ("uniform", 7, 9),
                                                            ("log_uniform", 1, 5)])
def test_unique_sampling_keeps_the_first_distinct_draws_in_order(sampler, num_sampled, num_classes):
    """Unique candidates are what drawing one id at a time and skipping repeats gives: the first num_sampled
    distinct ids of the draw sequence, in order, and num_tries the draws it took (blocks of 2S, 4S, ... draws)."""
    cand = samplers.sample_candidates(sampler, num_sampled, num_classes, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    seen, order, tries, block = set(), [], 0, max(2 * num_sampled, 64)
    while len(order) < num_sampled:
        for k in samplers._draw(sampler, block, num_classes, None, g).tolist():
            if len(order) == num_sampled:
                break
            tries += 1
            if k not in seen:
                seen.add(k)
                order.append(k)
        block *= 2
    assert cand.ids.tolist() == order and cand.num_tries == tries


def test_sampling_is_reproducible_through_the_generator():
    a = samplers.sample_candidates("log_uniform", 50, 1000, generator=torch.Generator().manual_seed(7))
    b = samplers.sample_candidates("log_uniform", 50, 1000, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.ids, b.ids) and a.num_tries == b.num_tries


def test_expected_counts_follow_tensorflow():
    """1 - (1 - p)^num_tries under unique sampling; num_sampled * p without it or when no draw repeated."""
    probs = samplers.class_probabilities("log_uniform", 100)
    ids = torch.tensor([0, 5, 99])
    repeated = samplers.Candidates(ids, num_tries=7, probs=probs)
    assert_close(repeated.expected_count(ids, 3, unique=True), 1 - (1 - probs[ids]) ** 7, what="unique")
    assert_close(repeated.expected_count(ids, 3, unique=False), 3 * probs[ids], what="not unique")
    no_repeat = samplers.Candidates(ids, num_tries=3, probs=probs)
    assert_close(no_repeat.expected_count(ids, 3, unique=True), 3 * probs[ids], what="no repeat")


def test_unigram_label_the_sampler_cannot_draw_is_rejected():
    counts = torch.ones(20)
    counts[4] = 0
    x, w = torch.randn(2, 3), torch.randn(20, 3)
    with pytest.raises(ValueError, match="labels"):
        kc_kernels.sampled_softmax_loss(x, w, None, torch.tensor([4, 1]), num_sampled=5, sampler="unigram",
                                        class_counts=counts, backend="reference")
