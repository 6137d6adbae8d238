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


@pytest.mark.parametrize("chunk,passes,row_block", [(1, 16, 8192), (4, 16, 8192), (100, 16, 8192),
                                                      (4, 1, 5), (100, 0, 7)])
def test_chunked_ap_matches_brute_force(chunk, passes, row_block, monkeypatch):
    # passes: classes with more positives than this are sorted instead of compared pass by pass (0: all sorted)
    monkeypatch.setattr(evaluate, "MAX_THRESHOLD_PASSES", passes)
    monkeypatch.setattr(evaluate, "ROW_BLOCK", row_block)
    tax = taxonomy.generate(3, 17, seed=2)
    rng = np.random.default_rng(0)
    N = 41
    fine = rng.choice(tax.leaves(), N)
    lab = [tax.labels_of(int(c)) for c in fine]
    labels = Labels(np.concatenate([[0], np.cumsum([len(x) for x in lab])]), np.concatenate(lab).astype(np.int32))
    S = rng.integers(0, 4, (N, tax.num_classes)).astype(np.float32)  # many ties
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
