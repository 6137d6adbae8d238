"""Samples: a seeded synthetic hierarchical generator, feature shards (.npy memmaps + multi-label CSR) and image
folders. Every source gives the same interface (SampleSet): inputs for a batch of row ids, and the labels as CSR.

Labels of a row list its fine class first, then the fine class's ancestors; the row's vertical (whose teacher
labels it) is the vertical of that first label.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from kc import checkpoint
from kc.checkpoint import write_json
from kc.taxonomy import Taxonomy


class DataError(ValueError):
    """Data that cannot be read as samples of the taxonomy; the message names the file."""


@dataclass
class Labels:
    """Multi-label rows in CSR form: row i's classes are indices[indptr[i]:indptr[i + 1]], fine class first."""

    indptr: np.ndarray  # [N + 1] int64
    indices: np.ndarray  # [nnz] int32

    def __len__(self):
        return len(self.indptr) - 1

    def fine(self) -> np.ndarray:
        return self.indices[self.indptr[:-1]].astype(np.int64)

    def rows(self, idx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(indptr, indices) of the given rows."""
        starts, ends = self.indptr[idx], self.indptr[idx + 1]
        lens = ends - starts
        ptr = np.concatenate([[0], np.cumsum(lens)])
        if len(idx) == 0:
            return ptr, np.zeros(0, dtype=np.int32)
        take = np.repeat(starts - ptr[:-1], lens) + np.arange(ptr[-1])
        return ptr, self.indices[take]

    def padded(self, idx: np.ndarray, width: Optional[int] = None) -> np.ndarray:
        """[len(idx), width] int64 label ids with -1 padding."""
        ptr, ind = self.rows(idx)
        lens = np.diff(ptr)
        w = int(lens.max(initial=1)) if width is None else width
        out = np.full((len(idx), w), -1, dtype=np.int64)
        row = np.repeat(np.arange(len(idx)), lens)
        col = np.arange(len(ind)) - np.repeat(ptr[:-1], lens)
        keep = col < w
        out[row[keep], col[keep]] = ind[keep]
        return out

    def columns(self, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
        """The transpose (CSC): for each class, the rows that carry it."""
        lens = np.diff(self.indptr)
        row = np.repeat(np.arange(len(self), dtype=np.int64), lens)
        order = np.argsort(self.indices, kind="stable")
        counts = np.bincount(self.indices, minlength=num_classes)
        return np.concatenate([[0], np.cumsum(counts)]), row[order]


def check_labels(labels: Labels, num_classes: int, source: str) -> None:
    if labels.indptr[0] != 0 or np.any(np.diff(labels.indptr) <= 0):
        raise DataError(f"{source}: every row needs at least one label (indptr must rise strictly from 0)")
    if labels.indptr[-1] != len(labels.indices):
        raise DataError(f"{source}: indptr ends at {labels.indptr[-1]} but there are {len(labels.indices)} labels")
    if len(labels.indices) and (labels.indices.min() < 0 or labels.indices.max() >= num_classes):
        raise DataError(f"{source}: label ids must lie in [0, {num_classes}), found "
                        f"{labels.indices.min()}..{labels.indices.max()}")


class SampleSet:
    """A split: len(), inputs(idx) -> float tensor [B, ...], labels (CSR), input_shape."""

    labels: Labels
    input_shape: Tuple[int, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, idx: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def verticals(self, taxonomy: Taxonomy) -> np.ndarray:
        return taxonomy.vertical_of[self.labels.fine()]


# ------------------------------------------------------------------------------------------ feature shards

def _shard_paths(directory: str) -> List[str]:
    return sorted(glob.glob(os.path.join(directory, "shard-*.features.npy")))


SHARD_SUFFIXES = (".indptr.npy", ".indices.npy", ".features.npy")


SHARD_NAMES = re.compile(r"shard-[0-9]{5}\.(features|indptr|indices)\.npy")


def check_shard_files(directory: str) -> None:
    """Where the directory has an index.json (shards written by ShardWriter), it must list every shard file by
    its plain name with its size and SHA-256, and every listed file must be there with that size and digest:
    DataError naming the first that is not."""
    ipath = os.path.join(directory, "index.json")
    if not os.path.exists(ipath):
        return
    try:
        index = checkpoint.read_json(ipath)
    except checkpoint.DamagedFile as e:
        raise DataError(str(e)) from None
    files = index.get("files") if isinstance(index, dict) else None
    if not isinstance(files, dict) or not files:
        raise DataError(f"{ipath}: lists no shard files with their digests; rerun `kc data` (synthetic data) or "
                        "rewrite the shards with kc.data.ShardWriter")
    for name, want in sorted(files.items(), key=lambda kv: str(kv[0])):
        try:
            checkpoint.listed_file(directory, name, want, ipath, SHARD_NAMES)
        except ValueError as e:
            raise DataError(f"shard file {e}; rerun `kc data` (synthetic data) or restore the file") from None
    extra = sorted(set(os.path.basename(q) for q in _shard_paths(directory)) - set(files))
    if extra:
        raise DataError(f"{directory}: shard files not listed in {ipath}: {', '.join(extra)}")


class FeatureShards(SampleSet):
    """Rows from one or more shards `shard-NNNNN.{features,indptr,indices}.npy` in a directory (memmapped).

    Shards written by ShardWriter are checked against the sizes and SHA-256s in the directory's index.json."""

    def __init__(self, directory: str, num_classes: int):
        paths = _shard_paths(directory)
        if not paths:
            raise DataError(f"{directory}: no feature shards (shard-NNNNN.features.npy) found")
        check_shard_files(directory)
        self.features, ptrs, inds = [], [], []
        dim = None
        offset = 0
        for p in paths:
            stem = p[: -len(".features.npy")]
            arrays = []
            for q, mmap in ((p, "r"), (stem + ".indptr.npy", None), (stem + ".indices.npy", None)):
                if not os.path.isfile(q):  # a device or fifo would hang the reader
                    raise DataError(f"{q}: missing or not a regular file")
                try:
                    arrays.append(np.load(q, mmap_mode=mmap, allow_pickle=False))
                except (ValueError, OSError, EOFError) as e:
                    raise DataError(f"{q}: unreadable shard file, truncated or corrupted? ({e})") from None
            f, ptr, ind = arrays[0], arrays[1].astype(np.int64), arrays[2].astype(np.int32)
            if f.ndim != 2 or not np.issubdtype(f.dtype, np.floating):
                raise DataError(f"{p}: features must be a 2-D float array, got {f.dtype} {f.shape}")
            if dim is not None and f.shape[1] != dim:
                raise DataError(f"{p}: {f.shape[1]} features per row, earlier shards have {dim}")
            dim = f.shape[1]
            if len(ptr) != f.shape[0] + 1:
                raise DataError(f"{stem}.indptr.npy: {len(ptr)} entries for {f.shape[0]} rows (need rows + 1)")
            check_labels(Labels(ptr, ind), num_classes, stem)
            self.features.append(f)
            ptrs.append(ptr[1:] + offset)
            inds.append(ind)
            offset += len(ind)
        self.labels = Labels(np.concatenate([[0]] + ptrs).astype(np.int64), np.concatenate(inds))
        self.starts = np.cumsum([0] + [f.shape[0] for f in self.features])
        self.input_shape = (dim,)

    def inputs(self, idx: np.ndarray) -> torch.Tensor:
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.input_shape[0]), dtype=np.float32)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        for s in np.unique(shard):
            m = shard == s
            local = idx[m] - self.starts[s]
            order = np.argsort(local)  # sorted reads are kinder to a memmap
            rows = np.asarray(self.features[s][local[order]], dtype=np.float32)
            out[np.flatnonzero(m)[order]] = rows
        return torch.from_numpy(out)


class ShardWriter:
    """Writes rows as shards, one chunk at a time, so a split of any size never sits in memory."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        for p in glob.glob(os.path.join(directory, "shard-*")) + glob.glob(os.path.join(directory, "index.json")):
            os.remove(p)  # a half-written split from an interrupted run
        self.count = 0
        self.rows = 0
        self.files = {}

    def write(self, features: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> None:
        stem = os.path.join(self.directory, f"shard-{self.count:05d}")
        for suffix, arr in zip(SHARD_SUFFIXES, (indptr.astype(np.int64), indices.astype(np.int32),
                                                features.astype(np.float32))):
            # features last: a shard is visible only when complete
            checkpoint.write_array(stem + suffix, arr)
            self.files[os.path.basename(stem + suffix)] = {"bytes": os.path.getsize(stem + suffix),
                                                           "sha256": checkpoint.file_sha256(stem + suffix)}
            checkpoint.crash_point()
        self.count += 1
        self.rows += features.shape[0]

    def close(self, meta: dict) -> None:
        meta = dict(meta, shards=self.count, rows=self.rows, files=self.files)
        write_json(os.path.join(self.directory, "index.json"), meta)


# ------------------------------------------------------------------------------------------ image folders

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class ImageFolder(SampleSet):
    """root/<class name>/<image>: each image is a sample of that class (and of its ancestors).

    Class names with '/' in them are nested folders. Images are read with PIL, converted to RGB, resized to
    image_size x image_size and scaled to [0, 1].
    """

    def __init__(self, root: str, taxonomy: Taxonomy, image_size: int = 32):
        if not os.path.isdir(root):
            raise DataError(f"image folder {root} does not exist")
        index = {n: i for i, n in enumerate(taxonomy.names)}
        files, classes = [], []
        for dirpath, _, filenames in sorted(os.walk(root)):
            imgs = sorted(f for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS))
            if not imgs:
                continue
            odd = [f for f in imgs if not os.path.isfile(os.path.join(dirpath, f))]
            if odd:  # a device or fifo would block the reader
                raise DataError(f"{os.path.join(dirpath, odd[0])}: not a regular file")
            name = os.path.relpath(dirpath, root).replace(os.sep, "/")
            if name not in index:
                raise DataError(f"{dirpath}: folder {name!r} is not a class of the taxonomy")
            files += [os.path.join(dirpath, f) for f in imgs]
            classes += [index[name]] * len(imgs)
        if not files:
            raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        self.files = files
        lab = [taxonomy.labels_of(c) for c in classes]
        self.labels = Labels(np.concatenate([[0], np.cumsum([len(x) for x in lab])]).astype(np.int64),
                             np.concatenate(lab).astype(np.int32))
        self.image_size = image_size
        self.input_shape = (3, image_size, image_size)

    def inputs(self, idx: np.ndarray) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        out = np.empty((len(idx),) + self.input_shape, dtype=np.float32)
        for k, i in enumerate(np.asarray(idx)):
            try:
                with Image.open(self.files[i]) as im:
                    im = im.convert("RGB").resize((self.image_size, self.image_size))
                    out[k] = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"{self.files[i]}: unreadable image ({e})") from None
        return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------ synthetic data

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

    SPLITS = {"train": 1, "test": 2}

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

    def fine_classes(self, split: str) -> np.ndarray:
        """The fine (leaf) class of every row of a split, in row order."""
        per = self.cfg.train_per_class if split == "train" else self.cfg.test_per_class
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
        indptr = np.concatenate([[0], np.cumsum([len(x) for x in lab])]).astype(np.int64)
        return x, indptr, np.concatenate(lab).astype(np.int32)

    # ------------------------------------------------------------------ the Bayes-optimal posterior
    # A row of leaf c in vertical v is x = center_v + B_v (code_c + mode + noise_v * z) + iso * e, z and e standard
    # normal: Gaussian with covariance S_v = iso^2 I + noise_v^2 B_v B_v^T (B_v orthonormal columns), one Gaussian
    # per pose. With r = x - center_v: -2 log N(x) = |r - B c|^2 / iso^2 - a_v |B^T r - c|^2 + log det S_v + const,
    # a_v = noise_v^2 / (iso^2 (iso^2 + noise_v^2)), which takes two GEMMs per vertical.

    def _leaves_of(self, v: int) -> np.ndarray:
        c = np.asarray(self.tax.classes_of(v))
        return c[self.tax.is_leaf[c]]

    def leaf_log_joint(self, x: np.ndarray, v: int) -> np.ndarray:
        """log p(x, c) for every leaf c of vertical v (prior: leaves equally likely): [n, leaves of v]."""
        cfg = self.cfg
        iso2 = max(cfg.isotropic_noise, 1e-3) ** 2
        n2 = float(self.noise[v]) ** 2
        a = n2 / (iso2 * (iso2 + n2))
        D, d = cfg.feature_dim, cfg.subspace_dim
        logdet = (D - d) * np.log(iso2) + d * np.log(iso2 + n2)
        leaves = self._leaves_of(v)
        r = x.astype(np.float64) - self.center[v]
        p = r @ self.basis[v].astype(np.float64)  # [n, d]
        rr = (r * r).sum(1, keepdims=True)
        pp = (p * p).sum(1, keepdims=True)
        out = None
        for m in range(cfg.modes):
            code = (self.code[leaves] + self.mode_code[self.root[leaves], m]).astype(np.float64)  # [L, d]
            cc = (code * code).sum(1)[None]
            pc = p @ code.T
            # |r - B c|^2 = rr - 2 p.c + cc;  |p - c|^2 = pp - 2 p.c + cc
            q = (rr - 2 * pc + cc) / iso2 - a * (pp - 2 * pc + cc)
            lm = -0.5 * (q + logdet) - np.log(cfg.modes)
            out = lm if out is None else np.logaddexp(out, lm)
        n_leaves = int(self.tax.is_leaf.sum())
        return out - np.log(n_leaves)

    def class_log_posterior(self, x: np.ndarray, v: int, log_z: Optional[np.ndarray] = None) -> np.ndarray:
        """log P(k | x) for every class k of vertical v (a parent: the sum over its leaves): [n, N_v]. log_z [n]:
        log p(x) over all verticals; None conditions on the row belonging to v (what v's teacher is asked)."""
        lj = self.leaf_log_joint(x, v)
        m = lj.max(1, keepdims=True)
        if log_z is None:
            log_z = (m + np.log(np.exp(lj - m).sum(1, keepdims=True)))[:, 0]
        rel = np.exp(lj - m)  # [n, L]
        c0 = int(self.tax.segments[v])
        leaves = self._leaves_of(v)
        member = np.zeros((len(leaves), len(self.tax.classes_of(v))))  # leaf -> every class it is a sample of
        for i, c in enumerate(leaves):
            member[i, np.asarray(self.tax.labels_of(int(c))) - c0] = 1.0
        with np.errstate(divide="ignore"):
            return np.log(rel @ member) + m - log_z[:, None]

    def _siblings(self, c: int) -> np.ndarray:
        if c not in self.siblings:
            p = self.tax.parent[c]
            sib = np.flatnonzero((self.tax.parent == p) & self.tax.is_leaf) if p >= 0 else np.zeros(0, int)
            self.siblings[c] = sib[sib != c]
        return self.siblings[c]


def write_synthetic(directory: str, taxonomy: Taxonomy, cfg, seed: int, progress=None) -> dict:
    """Generates train/ and test/ feature shards under directory, streaming shard by shard."""
    gen = SyntheticGenerator(taxonomy, cfg, seed)
    sizes = {}
    for split in ("train", "test"):
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


def open_split(kind: str, directory: str, taxonomy: Taxonomy, image_size: int = 32) -> SampleSet:
    if kind in ("synthetic", "features"):
        return FeatureShards(directory, taxonomy.num_classes)
    if kind == "images":
        return ImageFolder(directory, taxonomy, image_size)
    raise DataError(f"unknown data kind {kind!r}")


def fingerprint(data: SampleSet) -> str:
    """A cheap identity of a split (size and labels), to tie a teacher cache to the rows it was computed on."""
    import hashlib

    h = hashlib.sha256()
    h.update(np.asarray(len(data)).tobytes())
    h.update(np.ascontiguousarray(data.labels.indptr).tobytes())
    h.update(np.ascontiguousarray(data.labels.indices).tobytes())
    return h.hexdigest()[:16]
