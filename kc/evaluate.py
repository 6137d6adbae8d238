"""Evaluation: average precision per class on the test split, mAP per vertical and overall, top-1 and top-5.

No [N_test, V] score matrix is ever held: AP is computed over column chunks of classes ([N_test, chunk] scores,
AP per class, discard), and top-k over row chunks. AP follows the usual (scikit-learn) definition
AP = sum over thresholds of (R_n - R_{n-1}) P_n, i.e. the mean over a class's positives p of
#positives scoring >= s_p / #samples scoring >= s_p (ties share a threshold). Top-k asks whether a sample's fine
class is among the k best-scored classes, not counting its ancestors (also correct labels) as competitors.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

import kc_kernels
from kc.data import SampleSet
from kc.models import Specialist, Student
from kc.taxonomy import Taxonomy


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Brute-force AP of one class (the definition the chunked version must match); NaN without positives."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    if not positive.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], positive[order]
    ap, tp, prev_recall = 0.0, 0, 0.0
    n_pos = p.sum()
    i = 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        tp += p[i:j].sum()
        recall = tp / n_pos
        ap += (recall - prev_recall) * tp / j
        prev_recall = recall
        i = j
    return float(ap)


class Scorer:
    """Scores of a model on the test rows: block(v, c0, c1) -> [N, c1 - c0] (classes in vertical v, all rows),
    rows(r0, r1) -> [r1 - r0, V] (all classes)."""

    num_classes: int

    def block(self, v: int, c0: int, c1: int) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        raise NotImplementedError


def _batched(fn, data: SampleSet, row_chunk: int, device) -> torch.Tensor:
    out = []
    for r in range(0, len(data), row_chunk):
        out.append(fn(data.inputs(np.arange(r, min(r + row_chunk, len(data)))).to(device)))
    return torch.cat(out)


class StudentScorer(Scorer):
    """Holds the student's hidden units of every test row ([N, s2] or [N, M, s2], small) and the per-vertical
    norms the self-paced scale divides by; logits (kc_kernels.soft_target_logits) are computed block by block
    from them."""

    def __init__(self, model: Student, data: SampleSet, row_chunk: int, device="cpu"):
        self.model, self.seg, self.row_chunk = model, model.segments.tolist(), row_chunk
        self.num_classes = model.num_classes
        with torch.no_grad():
            self.h = _batched(model.hidden, data, row_chunk, device)
            self.norm = None
            if model.scale is not None:
                # ||u||^2 = h^T (W_v^T W_v) h: the vertical's Gram matrix (float64) instead of all its raw scores
                M, N = len(self.seg) - 1, self.h.shape[0]
                self.norm = torch.empty(N, M, device=self.h.device)
                for v in range(M):
                    w = model.head.weight[self.seg[v]:self.seg[v + 1]].double()
                    gram = w.t() @ w
                    for r in range(0, N, row_chunk):
                        h = self.h[r:r + row_chunk]
                        hv = (h[:, v] if h.dim() == 3 else h).double()
                        sq = ((hv @ gram) * hv).sum(1).clamp_min(0.0)
                        self.norm[r:r + row_chunk, v] = torch.sqrt(sq + 1e-12).float()

    @torch.no_grad()
    def block(self, v, c0, c1) -> torch.Tensor:
        m = self.model
        h = self.h[:, v] if self.h.dim() == 3 else self.h
        return kc_kernels.soft_target_logits(h, m.head.weight[c0:c1], m.head.bias[c0:c1], scale=m.gamma(v, c0, c1),
                                             norms=None if self.norm is None else self.norm[:, v:v + 1],
                                             block=self.row_chunk)

    @torch.no_grad()
    def rows(self, r0, r1) -> torch.Tensor:
        m = self.model
        return kc_kernels.soft_target_logits(self.h[r0:r1], m.head.weight, m.head.bias, self.seg, m.scale,
                                             norms=None if self.norm is None else self.norm[r0:r1])


class SpecialistScorer(Scorer):
    """The specialists together: class c is scored by its vertical's teacher (sigmoid logits). One teacher's
    hidden units of all test rows are kept at a time ([N, H]); its logits are computed chunk by chunk."""

    def __init__(self, teachers: List[Specialist], taxonomy: Taxonomy, data: SampleSet, row_chunk: int, device="cpu"):
        self.teachers, self.data, self.row_chunk, self.device = teachers, data, row_chunk, device
        self.seg = taxonomy.segments.tolist()
        self.num_classes = taxonomy.num_classes
        self._v, self._h = None, None

    @torch.no_grad()
    def block(self, v, c0, c1) -> torch.Tensor:
        t = self.teachers[v]
        if self._v != v:
            self._v, self._h = v, None
            self._h = _batched(t.backbone, self.data, self.row_chunk, self.device)
        lo, hi = c0 - self.seg[v], c1 - self.seg[v]
        return self._h @ t.out.weight[lo:hi].t() + t.out.bias[lo:hi]

    @torch.no_grad()
    def rows(self, r0, r1) -> torch.Tensor:
        x = self.data.inputs(np.arange(r0, r1)).to(self.device)
        return torch.cat([t(x) for t in self.teachers], dim=1)


class BayesScorer(Scorer):
    """The generator's Bayes-optimal posterior P(class | x) (log) over all classes: the best any model can score
    on synthetic data. Each row's normaliser over every leaf of every vertical is computed once."""

    def __init__(self, generator, data: SampleSet, row_chunk: int):
        self.gen, self.data, self.row_chunk = generator, data, row_chunk
        self.seg = generator.tax.segments.tolist()
        self.num_classes = generator.tax.num_classes
        self.x = data.inputs(np.arange(len(data))).numpy()
        M = len(self.seg) - 1
        self.log_z = np.full(len(data), -np.inf)
        for v in range(M):
            lv = self.gen.leaf_log_joint(self.x, v)  # [N, leaves of v]
            m = lv.max(1)
            self.log_z = np.logaddexp(self.log_z, m + np.log(np.exp(lv - m[:, None]).sum(1)))
        self._v, self._block = None, None

    def _vertical(self, v, x, log_z):
        return torch.from_numpy(self.gen.class_log_posterior(x, v, log_z))

    def block(self, v, c0, c1) -> torch.Tensor:
        if self._v != v:
            self._v, self._block = v, self._vertical(v, self.x, self.log_z)
        return self._block[:, c0 - self.seg[v]:c1 - self.seg[v]]

    def rows(self, r0, r1) -> torch.Tensor:
        return torch.cat([self._vertical(v, self.x[r0:r1], self.log_z[r0:r1]) for v in range(len(self.seg) - 1)],
                         dim=1)


ROW_BLOCK = 8192  # rows of a [rows, classes] comparison at a time (stays in cache)
MAX_THRESHOLD_PASSES = 16  # a class with more test positives has its scores sorted instead


def _count_at_least(S: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    """For every column c of S [N, C]: the number of rows r with S[r, c] >= t[c]."""
    out = torch.zeros(S.shape[1], dtype=torch.int64, device=S.device)
    for r in range(0, S.shape[0], ROW_BLOCK):
        out += (S[r:r + ROW_BLOCK] >= t).sum(0)
    return out.cpu().numpy()


def _chunk_precisions(S: torch.Tensor, row: np.ndarray, col: np.ndarray, npos: np.ndarray) -> np.ndarray:
    """Precision at each positive (row[k], col[k]) of the scores S [N, C]: #positives of its class scoring >= it
    / #rows scoring >= it. Pairs come grouped by class (col ascending), npos[c] of class c.

    Every score is compared once per positive of its class, the way a class's threshold pass would, but with no
    gather of score columns for the common case: pass j compares whole rows of S against the j-th positive score
    of each class (classes with fewer positives are left out of that pass). A class with many positives has its
    column sorted once and its thresholds looked up."""
    N, C = S.shape
    dev = S.device
    p = S[torch.from_numpy(row).to(dev), torch.from_numpy(col).to(dev)]
    start = np.concatenate([[0], np.cumsum(npos)[:-1]])
    # positives of the same class at or above each pair's score: the end of its run of ties, in a (class, score
    # descending) order
    pd = p.double().cpu().numpy()
    order = np.lexsort((-pd, col))
    sc, sp = col[order], pd[order]
    run_end = np.ones(len(sp), dtype=bool)
    run_end[:-1] = (sc[1:] != sc[:-1]) | (sp[1:] != sp[:-1])
    end = np.minimum.accumulate(np.where(run_end, np.arange(len(sp)), len(sp))[::-1])[::-1]
    n_pos = np.empty(len(sp))
    n_pos[order] = end - start[sc] + 1
    n_all = np.empty(len(sp))
    rank = np.arange(len(col)) - start[col]  # a pair's place among its class's positives
    many = npos > MAX_THRESHOLD_PASSES
    for j in range(int(min(npos.max(initial=0), MAX_THRESHOLD_PASSES))):
        sel = np.flatnonzero((rank == j) & ~many[col])
        if len(sel):
            cols = col[sel]
            block = S if len(cols) == C else S[:, torch.from_numpy(cols).to(dev)]
            n_all[sel] = _count_at_least(block, p[torch.from_numpy(sel).to(dev)])
    for c in np.flatnonzero(many):
        sel = np.flatnonzero(col == c)
        ascending = torch.sort(S[:, c].contiguous()).values
        t = p[torch.from_numpy(sel).to(dev)].contiguous()
        n_all[sel] = N - torch.searchsorted(ascending, t, right=False).cpu().numpy()
    return n_pos / n_all


@torch.no_grad()
def ap_per_class(scorer: Scorer, taxonomy: Taxonomy, data: SampleSet, class_chunk: int,
                 progress: Optional[Callable] = None) -> np.ndarray:
    """AP of every class (NaN where the test split has no positive), in column chunks of classes."""
    V = taxonomy.num_classes
    colptr, colrows = data.labels.columns(V)
    ap = np.full(V, np.nan)
    seg = taxonomy.segments.tolist()
    chunks = [(v, c0, min(c0 + class_chunk, seg[v + 1])) for v in range(len(seg) - 1)
              for c0 in range(seg[v], seg[v + 1], class_chunk)]
    it = progress(chunks, desc="AP", unit="chunk", leave=False) if progress else chunks
    for v, c0, c1 in it:
        npos = np.diff(colptr[c0:c1 + 1])
        if npos.sum() == 0:
            continue
        S = scorer.block(v, c0, c1).float().contiguous()  # [N, C]
        col = np.repeat(np.arange(c1 - c0), npos)
        prec = _chunk_precisions(S, colrows[colptr[c0]:colptr[c1]], col, npos)
        sums = np.bincount(col, weights=prec, minlength=c1 - c0)
        has = npos > 0
        ap[c0:c1][has] = sums[has] / npos[has]
    return ap


@torch.no_grad()
def top_k_accuracy(scorer: Scorer, taxonomy: Taxonomy, data: SampleSet, ks=(1, 5),
                   progress: Optional[Callable] = None) -> Dict[int, float]:
    N, V = len(data), taxonomy.num_classes
    fine = data.labels.fine()
    rows = max(1, min(N, (1 << 23) // V))  # bound a row chunk's [rows, V] scores to 32 MB
    hits = {k: 0 for k in ks}
    kmax = min(max(ks), V)
    starts = range(0, N, rows)
    for r0 in (progress(starts, desc="top-k", unit="chunk", leave=False) if progress else starts):
        r1 = min(N, r0 + rows)
        S = scorer.rows(r0, r1).float()
        for i in range(r1 - r0):  # ancestors are correct too: keep them out of the fine class's way
            anc = taxonomy.ancestors(int(fine[r0 + i]))
            if anc:
                S[i, anc] = -float("inf")
        top = S.topk(kmax, dim=1).indices.cpu().numpy()
        f = fine[r0:r1, None]
        for k in ks:
            hits[k] += int((top[:, :k] == f).any(1).sum())
    return {k: hits[k] / N for k in ks}


def summarize(ap: np.ndarray, taxonomy: Taxonomy) -> Dict:
    per_vertical = []
    for v in range(taxonomy.num_verticals):
        a = ap[taxonomy.classes_of(v).start:taxonomy.classes_of(v).stop]
        per_vertical.append(float(np.nanmean(a)) if np.isfinite(a).any() else float("nan"))
    finite = [m for m in per_vertical if np.isfinite(m)]
    # "map" weighs every class alike (large verticals dominate); "map_vertical_avg" every vertical alike
    return {"map_per_vertical": per_vertical, "map": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
            "map_vertical_avg": float(np.mean(finite)) if finite else float("nan"),
            "classes_evaluated": int(np.isfinite(ap).sum())}


@torch.no_grad()
def time_per_sample(forward: Callable, data: SampleSet, batch: int, device="cpu", repeats: int = 7) -> float:
    """Milliseconds per sample of a full forward (all classes) over a batch of test inputs: the fastest of a few
    repeats, since other load on the machine only ever adds time."""
    x = data.inputs(np.arange(min(batch, len(data)))).to(device)
    forward(x)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(x)
        times.append(time.perf_counter() - t0)
    return float(np.min(times)) * 1000.0 / x.shape[0]


def evaluate(scorer: Scorer, taxonomy: Taxonomy, data: SampleSet, class_chunk: int,
             progress: Optional[Callable] = None) -> Dict:
    ap = ap_per_class(scorer, taxonomy, data, class_chunk, progress)
    out = summarize(ap, taxonomy)
    acc = top_k_accuracy(scorer, taxonomy, data, progress=progress)
    out.update(top1=acc[1], top5=acc[5])
    out["ap"] = [None if not np.isfinite(a) else float(a) for a in ap]
    return out
