import copy

import numpy as np
import pytest
import torch

from kc import evaluate, taxonomy
from kc.data import Labels
from tests.test_logits import reference_logits


def test_brute_force_ap_known_values():
    # ranking: pos, neg, pos -> precisions 1 and 2/3
    assert evaluate.average_precision([3, 2, 1], [1, 0, 1]) == pytest.approx((1 + 2 / 3) / 2)
    # a tie between a positive and a negative at the top: one threshold, precision 1/2
    assert evaluate.average_precision([1, 1, 0], [1, 0, 0]) == pytest.approx(0.5)
    assert np.isnan(evaluate.average_precision([1, 2], [0, 0]))


class DenseSet:
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)


class DenseScorer(evaluate.Scorer):
    def __init__(self, S):
        self.S = torch.as_tensor(S)

    def block(self, v, c0, c1):
        return self.S[:, c0:c1]

    def rows(self, r0, r1):
        return self.S[r0:r1]


def _random_problem(seed, n_rows=41, classes=17, levels=4, zeros=False):
    """Labels of a small taxonomy and scores with many ties (levels distinct values per column); zeros=True
    makes some of them -0.0 and others +0.0 (equal, so tied)."""
    tax = taxonomy.generate(3, classes, seed=seed)
    rng = np.random.default_rng(seed)
    fine = rng.choice(tax.leaves(), n_rows)
    lab = [tax.labels_of(int(c)) for c in fine]
    labels = Labels(np.concatenate([[0], np.cumsum([len(x) for x in lab])]), np.concatenate(lab).astype(np.int32))
    S = rng.integers(-levels // 2, levels - levels // 2, (n_rows, tax.num_classes)).astype(np.float32)
    if zeros:
        S[(S == 0) & (rng.random(S.shape) < 0.5)] = -0.0
    return tax, lab, labels, S


@pytest.mark.parametrize("chunk,budget", [(1, 1 << 21), (4, 1 << 21), (100, 1 << 21), (4, 1), (100, 7)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_ap_matches_brute_force(chunk, budget, seed, monkeypatch):
    """The one-pass AP (kept scores sorted as (column, score) keys, columns in batches of KEY_BUDGET kept
    scores; budget 1: a batch per column) equals the brute-force definition on tied scores, -0.0 tied with
    +0.0 included."""
    monkeypatch.setattr(evaluate, "KEY_BUDGET", budget)
    tax, lab, labels, S = _random_problem(seed, zeros=seed == 2)
    ap = evaluate.ap_per_class(DenseScorer(S), tax, DenseSet(labels), chunk)
    for c in range(tax.num_classes):
        pos = np.array([c in row for row in lab])
        want = evaluate.average_precision(S[:, c], pos)
        if np.isnan(want):
            assert np.isnan(ap[c])
        else:
            assert ap[c] == pytest.approx(want, abs=1e-12)
    s = evaluate.summarize(ap, tax)
    assert s["map"] == pytest.approx(np.nanmean(ap))


def test_ap_of_continuous_scores_and_extremes():
    """Scores spread over the whole float range (tiny, huge, negative, infinite) order as floats do."""
    tax, lab, labels, _ = _random_problem(5, n_rows=300, classes=30)
    rng = np.random.default_rng(5)
    S = (rng.standard_normal((300, tax.num_classes)) * 10.0 ** rng.integers(-30, 30, (300, tax.num_classes)))
    S = S.astype(np.float32)
    S[rng.random(S.shape) < 0.02] = np.inf
    S[rng.random(S.shape) < 0.02] = -np.inf
    ap = evaluate.ap_per_class(DenseScorer(S), tax, DenseSet(labels), 8)
    for c in range(tax.num_classes):
        pos = np.array([c in row for row in lab])
        want = evaluate.average_precision(S[:, c], pos)
        assert (np.isnan(ap[c]) and np.isnan(want)) or ap[c] == pytest.approx(want, abs=1e-12)


def test_ordered_keys_sort_as_floats():
    v = torch.tensor([3.0, -0.0, 0.0, -1e-30, 1e-30, -np.inf, np.inf, -2.5, 1e38, -1e38, 1e-45, -1e-45])
    k = evaluate._ordered_keys(v, torch.zeros(len(v), dtype=torch.int64))
    for i in range(len(v)):
        for j in range(len(v)):
            assert (k[i] < k[j]) == (v[i] < v[j]) and (k[i] == k[j]) == (v[i] == v[j])
    assert (evaluate._ordered_keys(v, torch.ones(len(v), dtype=torch.int64)) > k.max()).all()


@pytest.mark.parametrize("chunk", [1, 5, 100])
def test_top_k_matches_dense_ranking(chunk):
    """Top-k from the chunks' merged best classes equals the rank of the fine class among all classes but its
    ancestors in the dense score matrix (distinct scores, so the ranking is unique)."""
    tax, lab, labels, _ = _random_problem(3, n_rows=60, classes=40)
    rng = np.random.default_rng(3)
    S = rng.standard_normal((60, tax.num_classes)).astype(np.float32)
    acc = evaluate.top_k_accuracy(DenseScorer(S), tax, DenseSet(labels), ks=(1, 2, 5), class_chunk=chunk)
    fine = labels.fine()
    rank = np.array([1 + sum(S[i, j] > S[i, fine[i]] for j in range(tax.num_classes)
                             if j not in tax.ancestors(int(fine[i]))) for i in range(60)])
    assert acc == {k: float(np.mean(rank <= k)) for k in (1, 2, 5)}


def test_top_k_ignores_ancestors():
    tax = taxonomy.from_rows([{"class": "p", "vertical": "v", "parent": ""},
                              {"class": "a", "vertical": "v", "parent": "p"},
                              {"class": "b", "vertical": "v", "parent": "p"}])
    labels = Labels(np.array([0, 2, 4]), np.array([1, 0, 2, 0], dtype=np.int32))
    S = np.array([[9.0, 5.0, 1.0], [9.0, 5.0, 1.0]], dtype=np.float32)
    acc = evaluate.top_k_accuracy(DenseScorer(S), tax, DenseSet(labels), ks=(1, 2))
    assert acc == {1: 0.5, 2: 1.0}


def test_student_scorer_matches_dense_scores():
    """The scorer's per-vertical norms (from the Gram matrix of the vertical's weights) give the student's own
    dense logits, with and without the self-paced scale, for FC-FC and grouped SC heads."""
    from kc import config, models

    tax = taxonomy.generate(3, 40, seed=1)
    cfg = config.load("tiny", None, {})
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((23, 16)).astype(np.float32))

    class Rows:
        def __len__(self):
            return x.shape[0]

        def inputs(self, idx):
            return x[torch.from_numpy(np.asarray(idx))]

    class Rows64(Rows):
        def inputs(self, idx):
            return super().inputs(idx).double()

    for head in ("fc_fc", "fc_sc"):
        for scale in ("none", "vertical"):
            torch.manual_seed(0)
            m = models.build_student(cfg, (16,), tax, head, scale).eval()
            want = m.scores(x)
            sc = evaluate.StudentScorer(m, Rows(), row_chunk=7)
            got = torch.cat([sc.block(v, int(tax.segments[v]), int(tax.segments[v + 1]))
                             for v in range(tax.num_verticals)], 1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sc.rows(5, 17), want[5:17], rtol=1e-5, atol=1e-5)
            if scale == "none":  # no norms from the Gram matrix: the reference's logits of its hidden units, bitwise
                m64, sc64 = copy.deepcopy(m).double(), evaluate.StudentScorer(copy.deepcopy(m).double(), Rows64(), 7)
                want64 = reference_logits(sc64.h, m64.head.weight, m64.head.bias, m64.segments)
                assert torch.equal(sc64.rows(0, x.shape[0]), want64)


def test_bayes_scorer_held_or_made_per_vertical_gives_the_same_scores(monkeypatch):
    """All test rows' posteriors computed in one pass (held) and a vertical's block made when the sweep reaches
    it (beyond BayesScorer.HOLD_BYTES) are the same float32 scores, and the same AP."""
    from kc import config, synthetic

    tax = taxonomy.generate(3, 30, seed=0)
    cfg = config.load("tiny").data
    gen = synthetic.SyntheticGenerator(tax, cfg, seed=1)
    x, ptr, ind = gen.make(np.repeat(tax.leaves(), 4), np.random.default_rng(2))

    class Rows:
        labels = Labels(ptr, ind)

        def __len__(self):
            return x.shape[0]

        def inputs(self, idx):
            return torch.from_numpy(x[np.asarray(idx)])

    held = evaluate.BayesScorer(gen, Rows(), row_chunk=13)
    monkeypatch.setattr(evaluate.BayesScorer, "HOLD_BYTES", 0)
    made = evaluate.BayesScorer(synthetic.SyntheticGenerator(tax, cfg, seed=1), Rows(), row_chunk=13)
    assert held.blocks is not None and made.blocks is None
    for v in range(tax.num_verticals):
        c0, c1 = int(tax.segments[v]), int(tax.segments[v + 1])
        torch.testing.assert_close(held.block(v, c0, c1), made.block(v, c0, c1), rtol=0, atol=1e-6)
    torch.testing.assert_close(held.rows(3, 40), made.rows(3, 40), rtol=0, atol=1e-6)
    a = evaluate.ap_per_class(held, tax, Rows(), class_chunk=7)
    b = evaluate.ap_per_class(made, tax, Rows(), class_chunk=7)
    assert np.allclose(a, b, equal_nan=True)
