"""Evaluation: average precision per class on the test split, mAP per vertical and overall, top-1 and top-5.

No [N_test, V] score matrix is ever held: one pass over column chunks of classes computes [N_test, chunk] scores,
the AP of each of their classes and each row's best classes so far, and discards them. AP follows the usual
(scikit-learn) definition AP = sum over thresholds of (R_n - R_{n-1}) P_n, i.e. the mean over a class's positives
p of #positives scoring >= s_p / #samples scoring >= s_p (ties share a threshold). Top-k asks whether a sample's
fine class is among the k best-scored classes, not counting its ancestors (also correct labels) as competitors.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

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
        return torch.addmm(t.out.bias[lo:hi], self._h, t.out.weight[lo:hi].t())  # the bias in the GEMM's pass

    @torch.no_grad()
    def rows(self, r0, r1) -> torch.Tensor:
        x = self.data.inputs(np.arange(r0, r1)).to(self.device)
        return torch.cat([t(x) for t in self.teachers], dim=1)


class BayesScorer(Scorer):
    """The generator's Bayes-optimal posterior P(class | x) (log) over all classes: the best any model can score
    on synthetic data, computed in float64 and held as float32.

    Where every test row's posteriors fit in HOLD_BYTES (the default preset's 51,000 rows x 2,000 classes take
    408 MB), they are computed in one pass over row blocks, each vertical's leaf densities once (kc/synthetic.py,
    all_log_posteriors). Otherwise each row's normaliser log p(x) is computed first, and a vertical's block when
    the sweep reaches it."""

    HOLD_BYTES = 1 << 30

    def __init__(self, generator, data: SampleSet, row_chunk: int):
        self.gen, self.data, self.row_chunk = generator, data, row_chunk
        self.seg = generator.tax.segments.tolist()
        self.num_classes = generator.tax.num_classes
        self.x = data.inputs(np.arange(len(data))).numpy()
        n, M = len(self.x), len(self.seg) - 1
        self.blocks, self.log_z = None, None
        self._v, self._block = None, None
        if 4 * n * self.num_classes <= self.HOLD_BYTES:
            self.blocks = [np.empty((n, self.seg[v + 1] - self.seg[v]), dtype=np.float32) for v in range(M)]
            for r in range(0, n, row_chunk):
                generator.all_log_posteriors(self.x[r:r + row_chunk], out=[b[r:r + row_chunk] for b in self.blocks])
        else:
            self.log_z = np.concatenate([generator.log_evidence(self.x[r:r + row_chunk])
                                         for r in range(0, n, row_chunk)] or [np.zeros(0)])

    def _vertical(self, v, x, log_z):
        out = np.empty((len(x), self.seg[v + 1] - self.seg[v]), dtype=np.float32)
        for r in range(0, len(x), self.row_chunk):
            out[r:r + self.row_chunk] = self.gen.class_log_posterior(x[r:r + self.row_chunk], v,
                                                                     log_z[r:r + self.row_chunk])
        return torch.from_numpy(out)

    def block(self, v, c0, c1) -> torch.Tensor:
        if self.blocks is not None:
            return torch.from_numpy(self.blocks[v][:, c0 - self.seg[v]:c1 - self.seg[v]])
        if self._v != v:
            self._v, self._block = v, self._vertical(v, self.x, self.log_z)
        return self._block[:, c0 - self.seg[v]:c1 - self.seg[v]]

    def rows(self, r0, r1) -> torch.Tensor:
        if self.blocks is not None:
            return torch.cat([torch.from_numpy(b[r0:r1]) for b in self.blocks], dim=1)
        return torch.cat([self._vertical(v, self.x[r0:r1], self.log_z[r0:r1]) for v in range(len(self.seg) - 1)],
                         dim=1)


KEY_BUDGET = 1 << 21  # scores sorted at a time in a chunk's AP (with their indices about 28 bytes each)


def _ordered_keys(values: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """int64 keys column * 2**32 + k(value), where k maps float32 to [0, 2**32) keeping their order: sorting the
    keys sorts by column, then by score. -0.0 becomes +0.0 first, since the two compare equal (a tie)."""
    v = torch.where(values == 0, torch.zeros_like(values), values).float()
    b = v.view(torch.int32).to(torch.int64)
    # a non-negative float's bits grow with it; a negative float's bits grow with its magnitude
    k = torch.where(b < 0, -1 - b, b + (1 << 31))
    return (column.to(torch.int64) << 32) | k


def _column_counts(mask: torch.Tensor) -> np.ndarray:
    if mask.device.type == "cpu":  # numpy counts down the rows of a [N, C] mask about ten times faster
        return np.count_nonzero(mask.numpy(), axis=0)
    return mask.sum(0).cpu().numpy()


def _chunk_ap(S: torch.Tensor, row: np.ndarray, col: np.ndarray, npos: np.ndarray) -> np.ndarray:
    """AP of each column of S [N, C] with positives (NaN for the others). The positives (row[k], col[k]) come
    grouped by column (col ascending), npos[c] of column c.

    A positive's precision needs the number of rows scoring at least as high as it in its column. Only scores at
    or above the column's lowest positive can be such rows, and for a trained model they are a few percent of
    the column: those are picked out with one comparison, turned into keys (column, score) and sorted, all
    columns at once, and each positive's count is a difference of two binary searches. Columns go in batches
    of at most KEY_BUDGET kept scores, so an untrained model (every score kept) costs a sort of every column,
    in bounded memory."""
    N, C = S.shape
    dev = S.device
    ap = np.full(C, np.nan)
    if len(row) == 0:
        return ap
    row_t, col_t = torch.from_numpy(row).to(dev), torch.from_numpy(col).to(dev)
    p = S[row_t, col_t]
    pkey = _ordered_keys(p, col_t)
    end_key = (col_t + 1) << 32  # above every key of a positive's column
    # positives of its column scoring >= each positive
    pk_sorted = torch.sort(pkey).values
    n_pos = torch.searchsorted(pk_sorted, end_key) - torch.searchsorted(pk_sorted, pkey)
    floor = torch.full((C,), float("inf"), device=dev).scatter_reduce(0, col_t, p, "amin")
    kept = S >= floor  # a score below the lowest positive of its column precedes none of them
    counts = _column_counts(kept)
    n_all = torch.empty_like(n_pos)
    start = np.concatenate([[0], np.cumsum(npos)])  # a column's positives: start[c]:start[c + 1]
    c0 = 0
    while c0 < C:
        c1, total = c0 + 1, int(counts[c0])
        while c1 < C and total + counts[c1] <= KEY_BUDGET:
            total += int(counts[c1])
            c1 += 1
        r, c = kept[:, c0:c1].nonzero(as_tuple=True)
        keys = torch.sort(_ordered_keys(S[r, c + c0], c + c0)).values
        sel = slice(int(start[c0]), int(start[c1]))
        n_all[sel] = torch.searchsorted(keys, end_key[sel]) - torch.searchsorted(keys, pkey[sel])
        c0 = c1
    prec = n_pos.cpu().numpy() / n_all.cpu().numpy()
    sums = np.bincount(col, weights=prec, minlength=C)
    has = npos > 0
    ap[has] = sums[has] / npos[has]
    return ap


class _TopK:
    """The best `keep` classes of every row over the class chunks seen so far (scores and class ids, best
    first): the chunks' own best merged, so no [N, V] score matrix is held."""

    def __init__(self, keep: int):
        self.keep, self.values, self.index = keep, None, None

    def add(self, S: torch.Tensor, first_class: int) -> None:
        rows = None
        if self.values is not None and self.values.shape[1] == self.keep:
            # a row whose best score in the chunk does not beat its keep-th best so far keeps its list: topk pays
            # per row, and once a row's own vertical has been seen most rows are such rows
            rows = torch.nonzero(S.max(1).values > self.values[:, -1]).squeeze(1)
            if len(rows) == 0:
                return
            S = S[rows]
        v, i = S.topk(min(self.keep, S.shape[1]), dim=1)
        i = i + first_class
        if self.values is not None:
            old_v, old_i = (self.values, self.index) if rows is None else (self.values[rows], self.index[rows])
            v, i = torch.cat([old_v, v], 1), torch.cat([old_i, i], 1)
            v, j = v.topk(min(self.keep, v.shape[1]), dim=1)
            i = i.gather(1, j)
            if rows is not None:
                self.values[rows], self.index[rows] = v, i
                return
        self.values, self.index = v, i


def _ancestor_table(taxonomy: Taxonomy) -> np.ndarray:
    """[V, A] ancestors of every class, -1 padded (A = the most any class has, at least 1)."""
    width = max(1, taxonomy.depth() - 1)
    out = np.full((taxonomy.num_classes, width), -1, dtype=np.int64)
    for c in range(taxonomy.num_classes):
        a = taxonomy.ancestors(c)
        out[c, :len(a)] = a
    return out


def _top_k_hits(best: _TopK, fine: np.ndarray, ancestors: np.ndarray, ks) -> Dict[int, int]:
    """Rows whose fine class is among the k best-scored classes other than its own ancestors."""
    cand = best.index.cpu()
    anc = torch.from_numpy(ancestors[fine])
    # a candidate's rank among the row's candidates that are not ancestors of its fine class
    rank = torch.cumsum(~(cand[:, :, None] == anc[:, None, :]).any(2), 1)
    at = cand == torch.from_numpy(fine)[:, None]
    return {k: int((at & (rank <= k)).any(1).sum()) for k in ks}


def _chunks(taxonomy: Taxonomy, class_chunk: int) -> List:
    """(vertical, first class, end) of every chunk: at most class_chunk classes, never across verticals."""
    seg = taxonomy.segments.tolist()
    return [(v, c0, min(c0 + class_chunk, seg[v + 1])) for v in range(len(seg) - 1)
            for c0 in range(seg[v], seg[v + 1], class_chunk)]


def num_chunks(taxonomy: Taxonomy, class_chunk: int) -> int:
    return len(_chunks(taxonomy, class_chunk))


@torch.no_grad()
def sweep(scorer: Scorer, taxonomy: Taxonomy, data: SampleSet, class_chunk: int, ks=(1, 5),
          progress: Optional[Callable] = None) -> Tuple[np.ndarray, Dict[int, float]]:
    """One pass over the classes in chunks ([N, chunk] scores, then discarded): AP of every class (NaN where the
    test split has no positive) and top-k accuracy for each k in ks. Returns (ap [V], {k: accuracy})."""
    V, N = taxonomy.num_classes, len(data)
    colptr, colrows = data.labels.columns(V)
    ap = np.full(V, np.nan)
    fine = data.labels.fine()
    ancestors = _ancestor_table(taxonomy)
    best = _TopK(min(max(ks), V) + ancestors.shape[1]) if ks else None
    chunks = _chunks(taxonomy, class_chunk)
    for v, c0, c1 in (progress(chunks, desc="AP and top-k", unit="chunk", leave=False) if progress else chunks):
        npos = np.diff(colptr[c0:c1 + 1])
        if npos.sum() == 0 and best is None:
            continue
        S = scorer.block(v, c0, c1).float()  # [N, C]
        col = np.repeat(np.arange(c1 - c0), npos)
        ap[c0:c1] = _chunk_ap(S, colrows[colptr[c0]:colptr[c1]], col, npos)
        if best is not None:
            best.add(S, c0)
    acc = {}
    if best is not None and N:
        acc = {k: h / N for k, h in _top_k_hits(best, fine, ancestors, ks).items()}
    return ap, acc


def ap_per_class(scorer: Scorer, taxonomy: Taxonomy, data: SampleSet, class_chunk: int,
                 progress: Optional[Callable] = None) -> np.ndarray:
    """AP of every class (NaN where the test split has no positive), in column chunks of classes."""
    return sweep(scorer, taxonomy, data, class_chunk, ks=(), progress=progress)[0]


def top_k_accuracy(scorer: Scorer, taxonomy: Taxonomy, data: SampleSet, ks=(1, 5), class_chunk: int = 1024,
                   progress: Optional[Callable] = None) -> Dict[int, float]:
    return sweep(scorer, taxonomy, data, class_chunk, ks=ks, progress=progress)[1]


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
    ap, acc = sweep(scorer, taxonomy, data, class_chunk, ks=(1, 5), progress=progress)
    out = summarize(ap, taxonomy)
    out.update(top1=acc[1], top5=acc[5])
    out["ap"] = [None if not np.isfinite(a) else float(a) for a in ap]
    return out
