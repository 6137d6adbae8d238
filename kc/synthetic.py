"""The seeded synthetic hierarchical generator: rows whose difficulty has the shape Knowledge Concentration
addresses (verticals in overlapping subspaces, confusable siblings), written as feature shards by
write_synthetic, and the generator's Bayes-optimal posterior (the best any model can do on its data).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Tuple

import numpy as np

from kc.data import ShardWriter
from kc.taxonomy import Taxonomy


class SyntheticGenerator:
    """Seeded hierarchical data whose difficulty has the shape the method addresses.

    Each vertical owns a random `subspace_dim`-dimensional subspace of the feature space (subspaces of different
    verticals overlap) and a center. A class has a code in its vertical's subspace: a coarse class a random code,
    a fine class its parent's code plus a smaller offset, so siblings sit close and are confusable under the
    sample noise, which makes a teacher's probabilities over siblings informative (not one-hot). A fine-grained
    decision needs the vertical's whole subspace, and all verticals together need far more dimensions than the
    feature space has: a head whose last hidden layer is narrow cannot separate every vertical at once, while
    one network per vertical (a specialist) or per-vertical blocks (SC layers) can. Verticals also differ in
    size and noise, so they are learnt at different paces.
    """

    # a split's rows come from its own random streams (seed, split number, ...): validation rows are drawn apart
    # from train and test, and adding the split left both as they were
    SPLITS = {"train": 1, "test": 2, "val": 3}

    def __init__(self, taxonomy: Taxonomy, cfg, seed: int):
        self.tax, self.cfg, self.seed = taxonomy, cfg, seed
        D, d, M = cfg.feature_dim, cfg.subspace_dim, taxonomy.num_verticals
        rng = np.random.default_rng([seed, 7])
        self.center = rng.standard_normal((M, D)).astype(np.float32)
        self.center *= cfg.vertical_separation / np.linalg.norm(self.center, axis=1, keepdims=True)
        self.basis = np.stack([np.linalg.qr(rng.standard_normal((D, d)))[0] for _ in range(M)]).astype(np.float32)
        self.noise = (cfg.noise * (1 + cfg.noise_spread * rng.uniform(-1, 1, M))).astype(np.float32)
        depth = np.array([len(taxonomy.ancestors(c)) for c in range(taxonomy.num_classes)])
        self.code = np.zeros((taxonomy.num_classes, d), dtype=np.float32)
        for level in range(depth.max() + 1):  # parents before children
            cls = np.flatnonzero(depth == level)
            if level == 0:
                self.code[cls] = cfg.coarse_spread * rng.standard_normal((len(cls), d))
            else:
                spread = cfg.sibling_spread * 0.5 ** (level - 1)
                self.code[cls] = self.code[taxonomy.parent[cls]] + spread * rng.standard_normal((len(cls), d))
        # each coarse class appears in a few "poses" (shared by its fine classes): classes are multi-modal, so
        # separating them takes non-linear capacity, not a linear read-out of the features
        root = np.array([([c] + taxonomy.ancestors(c))[-1] for c in range(taxonomy.num_classes)])
        self.root = root
        mode_code = cfg.mode_spread * rng.standard_normal((taxonomy.num_classes, cfg.modes, d))
        self.mode_code = mode_code.astype(np.float32)
        self.siblings = {}
        self._terms, self._classes = {}, {}  # the posterior's per-vertical matrices (built on first use)

    def fine_classes(self, split: str) -> np.ndarray:
        """The fine (leaf) class of every row of a split, in row order."""
        per = {"train": self.cfg.train_per_class, "test": self.cfg.test_per_class,
               "val": self.cfg.val_per_class}[split]
        rows = np.repeat(self.tax.leaves(), per)
        return np.random.default_rng([self.seed, self.SPLITS[split], 0]).permutation(rows)

    def stream(self, split: str, chunk: int) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(features [n, D] float32, indptr, indices) chunk by chunk; chunk i depends only on (seed, split, i)."""
        fine = self.fine_classes(split)
        for i, start in enumerate(range(0, len(fine), chunk)):
            yield self.make(fine[start:start + chunk], np.random.default_rng([self.seed, self.SPLITS[split], 1 + i]),
                            label_noise=self.cfg.label_noise if split == "train" else 0.0)

    def make(self, fine: np.ndarray, rng: np.random.Generator,
             label_noise: float = 0.0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        cfg, tax = self.cfg, self.tax
        n, D, d = len(fine), cfg.feature_dim, cfg.subspace_dim
        vert = tax.vertical_of[fine]
        x = cfg.isotropic_noise * rng.standard_normal((n, D)).astype(np.float32)
        local = rng.standard_normal((n, d)).astype(np.float32)
        mode = rng.integers(cfg.modes, size=n)
        for v in np.unique(vert):
            m = vert == v
            z = self.code[fine[m]] + self.mode_code[self.root[fine[m]], mode[m]] + self.noise[v] * local[m]
            x[m] += self.center[v] + z @ self.basis[v].T
        labelled = fine.copy()
        if label_noise > 0:
            flip = np.flatnonzero(rng.random(n) < label_noise)
            for r in flip:  # an annotator's mistake: a sibling of the true class
                sib = self._siblings(int(fine[r]))
                if len(sib):
                    labelled[r] = sib[rng.integers(len(sib))]
        lab = [tax.labels_of(int(c)) for c in labelled]
        if cfg.multi_vertical > 0:  # draws nothing otherwise, so single-vertical data stays as it was
            for r, extra in self._other_objects(vert, rng, x):
                lab[r] = lab[r] + [c for leaf in extra for c in tax.labels_of(int(leaf))]
        indptr = np.concatenate([[0], np.cumsum([len(x) for x in lab])]).astype(np.int64)
        return x, indptr, np.concatenate(lab).astype(np.int32)

    def _other_objects(self, vert: np.ndarray, rng: np.random.Generator, x: np.ndarray):
        """Rows that also show objects of other verticals (a share data.multi_vertical of them): each such row
        gets 1 to max_verticals - 1 leaves of distinct other verticals, each object's features (center, code, pose
        and noise in its vertical's subspace) added to the row's. Yields (row, leaves); the row's first label stays
        its first object's, so the first vertical is still the one the row was drawn for."""
        cfg, tax = self.cfg, self.tax
        M, d = tax.num_verticals, cfg.subspace_dim
        rows = np.flatnonzero(rng.random(len(vert)) < cfg.multi_vertical)
        counts = rng.integers(1, cfg.max_verticals, size=len(rows))  # extra objects: 1 .. max_verticals - 1
        for r, k in zip(rows, counts):
            others = rng.permutation(np.delete(np.arange(M), vert[r]))[:k]
            leaves = []
            for v in others:
                cand = self._leaves_of(int(v))
                leaf = int(cand[rng.integers(len(cand))])
                z = (self.code[leaf] + self.mode_code[self.root[leaf], rng.integers(cfg.modes)]
                     + self.noise[v] * rng.standard_normal(d).astype(np.float32))
                x[r] += self.center[v] + self.basis[v] @ z
                leaves.append(leaf)
            yield int(r), leaves

    # ------------------------------------------------------------------ the Bayes-optimal posterior
    # A row of leaf c in vertical v is x = center_v + B_v (code_c + mode + noise_v * z) + iso * e, z and e standard
    # normal: Gaussian with covariance S_v = iso^2 I + noise_v^2 B_v B_v^T (B_v orthonormal columns), one Gaussian
    # per pose. With r = x - center_v: -2 log N(x) = |r - B c|^2 / iso^2 - a_v |B^T r - c|^2 + log det S_v + const,
    # a_v = noise_v^2 / (iso^2 (iso^2 + noise_v^2)), which takes one small GEMM per vertical and pose.

    def _leaves_of(self, v: int) -> np.ndarray:
        c = np.asarray(self.tax.classes_of(v))
        return c[self.tax.is_leaf[c]]

    def _leaf_terms(self, v: int):
        """Vertical v's leaves as one GEMM per pose: log p(x, leaf) = [p, row term, 1] @ [k code^T; 1; leaf term]
        with p = B_v^T (x - center_v), k = 1 / iso^2 - a_v (see leaf_log_joint). Cached: (leaves, row factors
        (1 / iso^2, a_v), a [d + 2, L] matrix per pose)."""
        if v not in self._terms:
            cfg = self.cfg
            iso2 = max(cfg.isotropic_noise, 1e-3) ** 2
            n2 = float(self.noise[v]) ** 2
            a = n2 / (iso2 * (iso2 + n2))
            D, d = cfg.feature_dim, cfg.subspace_dim
            logdet = (D - d) * np.log(iso2) + d * np.log(iso2 + n2)
            leaves = self._leaves_of(v)
            const = -0.5 * logdet - np.log(cfg.modes) - np.log(int(self.tax.is_leaf.sum()))
            k = 1.0 / iso2 - a
            mats = []
            for m in range(cfg.modes):
                code = (self.code[leaves] + self.mode_code[self.root[leaves], m]).astype(np.float64)  # [L, d]
                cc = (code * code).sum(1)
                mats.append(np.concatenate([k * code.T, np.ones((1, len(leaves))), (-0.5 * k * cc + const)[None]]))
            self._terms[v] = (leaves, (1.0 / iso2, a), mats)
        return self._terms[v]

    def leaf_log_joint(self, x: np.ndarray, v: int) -> np.ndarray:
        """log p(x, c) for every leaf c of vertical v (prior: leaves equally likely): [n, leaves of v].

        -2 log N(x) = (|r|^2 - 2 p.c + |c|^2) / iso^2 - a (|p|^2 - 2 p.c + |c|^2) + log det + const (p = B^T r):
        a term of the row, a term of the leaf and k p.c, k = 1 / iso^2 - a, so one GEMM of [p, row term, 1]
        against the cached [k code^T; 1; leaf term] gives every leaf's value (float64)."""
        _, (inv_iso2, a), mats = self._leaf_terms(v)
        r = x.astype(np.float64) - self.center[v]
        p = r @ self.basis[v].astype(np.float64)  # [n, d]
        row = -0.5 * (inv_iso2 * np.einsum("ij,ij->i", r, r) - a * np.einsum("ij,ij->i", p, p))
        P = np.concatenate([p, row[:, None], np.ones((len(p), 1))], axis=1)
        out = P @ mats[0]
        for mat in mats[1:]:  # further poses: a mixture
            out = np.logaddexp(out, P @ mat)
        return out

    def _class_map(self, v: int):
        """Where vertical v's leaves and its other classes sit among its classes, and which leaves each other
        class is the sum of ([L, internal] 0/1): cached."""
        if v not in self._classes:
            c0 = int(self.tax.segments[v])
            leaves = self._leaves_of(v)
            n_v = len(self.tax.classes_of(v))
            inner = np.setdiff1d(np.arange(n_v), leaves - c0)
            where = np.full(n_v, -1)
            where[inner] = np.arange(len(inner))
            member = np.zeros((len(leaves), len(inner)))  # leaf -> every other class it is a sample of
            for i, c in enumerate(leaves):
                up = np.asarray(self.tax.labels_of(int(c))) - c0
                up = where[up[where[up] >= 0]]
                member[i, up] = 1.0
            self._classes[v] = (leaves - c0, inner, member, _ranges(member))
        return self._classes[v]

    def _inner_sums(self, v: int, rel: np.ndarray) -> np.ndarray:
        """[n, internal classes]: each class's sum of rel over its leaves. Where the classes' leaves are disjoint
        runs of the leaf order (a two-level taxonomy: every parent's children are consecutive) the runs are summed
        in place (np.add.reduceat); otherwise a GEMM against the 0/1 membership."""
        _, _, member, runs = self._class_map(v)
        if runs is None:
            return rel @ member
        at, pick = runs
        return np.add.reduceat(rel, at, axis=1)[:, pick]

    def class_log_posterior(self, x: np.ndarray, v: int, log_z: Optional[np.ndarray] = None,
                            dtype=np.float64) -> np.ndarray:
        """log P(k | x) for every class k of vertical v (a parent: the sum over its leaves): [n, N_v]. log_z [n]:
        log p(x) over all verticals; None conditions on the row belonging to v (what v's teacher is asked)."""
        lj = self.leaf_log_joint(x, v)
        m = lj.max(1, keepdims=True)
        rel = np.exp(lj - m)  # [n, L]
        if log_z is None:
            log_z = m[:, 0] + np.log(rel.sum(1))
        return self._posterior(v, lj, m, self._inner_sums(v, rel), log_z, dtype)

    def _posterior(self, v, lj, m, inner_sum, log_z, dtype, out=None) -> np.ndarray:
        """A leaf's log posterior is its log joint less log_z; another class's, the log of its leaves' summed
        exp(lj - m) (inner_sum), plus m, less log_z. Written into out [n, N_v] when given."""
        leaf_col, inner = self._class_map(v)[:2]
        if out is None:
            out = np.empty((len(lj), len(leaf_col) + len(inner)), dtype=dtype)
        lo = int(leaf_col[0]) if len(leaf_col) else 0
        if len(leaf_col) and int(leaf_col[-1]) - lo + 1 == len(leaf_col):  # a slice: written in place, no copy
            np.subtract(lj, log_z[:, None], out=out[:, lo:lo + len(leaf_col)], casting="same_kind")
        else:
            out[:, leaf_col] = lj - log_z[:, None]
        if len(inner):
            with np.errstate(divide="ignore"):
                out[:, inner] = np.log(inner_sum) + (m - log_z[:, None])
        return out

    def log_evidence(self, x: np.ndarray) -> np.ndarray:
        """log p(x) [n]: the log-sum-exp of every leaf's log joint over every vertical."""
        log_z = np.full(len(x), -np.inf)
        for v in range(self.tax.num_verticals):
            lv = self.leaf_log_joint(x, v)
            m = lv.max(1)
            log_z = np.logaddexp(log_z, m + np.log(np.exp(lv - m[:, None]).sum(1)))
        return log_z

    def all_log_posteriors(self, x: np.ndarray, dtype=np.float32, out: Optional[list] = None) -> list:
        """log P(k | x) of every class of every vertical ([n, N_v] per vertical, or written into out's arrays)
        in one pass: each vertical's leaf log joints and their exp are computed once and serve both log p(x) and
        the posteriors. The values are those of log_evidence and class_log_posterior(x, v, log_z), computed in
        float64, stored as dtype."""
        log_z = np.full(len(x), -np.inf)
        parts = []
        for v in range(self.tax.num_verticals):
            lj = self.leaf_log_joint(x, v)
            m = lj.max(1, keepdims=True)
            rel = np.exp(lj - m)
            log_z = np.logaddexp(log_z, m[:, 0] + np.log(rel.sum(1)))
            parts.append((lj, m, self._inner_sums(v, rel)))
        return [self._posterior(v, lj, m, inner_sum, log_z, dtype, None if out is None else out[v])
                for v, (lj, m, inner_sum) in enumerate(parts)]

    def _siblings(self, c: int) -> np.ndarray:
        if c not in self.siblings:
            p = self.tax.parent[c]
            sib = np.flatnonzero((self.tax.parent == p) & self.tax.is_leaf) if p >= 0 else np.zeros(0, int)
            self.siblings[c] = sib[sib != c]
        return self.siblings[c]


def _ranges(member: np.ndarray):
    """For a 0/1 [leaves, classes] membership whose classes hold disjoint, non-empty runs of consecutive leaves
    in increasing order: (np.add.reduceat's indices, where each class's run is among the sums); else None.
    Leaves outside every run (a gap) are a sum of their own, which is not picked."""
    at, pick = [], []
    end = 0
    for j in range(member.shape[1]):
        rows = np.flatnonzero(member[:, j])
        if not len(rows) or rows[0] < end or rows[-1] - rows[0] + 1 != len(rows):
            return None
        if rows[0] > end:
            at.append(end)
        pick.append(len(at))
        at.append(int(rows[0]))
        end = int(rows[-1]) + 1
    if not at:
        return None
    if end < member.shape[0]:
        at.append(end)
    return np.asarray(at, dtype=np.intp), np.asarray(pick, dtype=np.intp)


def write_synthetic(directory: str, taxonomy: Taxonomy, cfg, seed: int, progress=None) -> dict:
    """Generates train/, val/ (when data.val_per_class > 0) and test/ feature shards under directory, streaming
    shard by shard."""
    gen = SyntheticGenerator(taxonomy, cfg, seed)
    sizes = {}
    for split in ("train", "val", "test") if cfg.val_per_class > 0 else ("train", "test"):
        writer = ShardWriter(os.path.join(directory, split))
        n = len(gen.fine_classes(split))
        chunks = gen.stream(split, cfg.shard_size)
        if progress is not None:
            chunks = progress(chunks, total=-(-n // cfg.shard_size), desc=f"data {split}", unit="shard")
        for feats, ptr, ind in chunks:
            writer.write(feats, ptr, ind)
        writer.close({"split": split, "feature_dim": cfg.feature_dim, "num_classes": taxonomy.num_classes,
                      "seed": seed})
        sizes[split] = writer.rows
    return sizes
