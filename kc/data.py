"""Samples: feature shards (.npy memmaps + multi-label CSR) and image folders (the seeded synthetic generator,
which writes feature shards, is kc/synthetic.py). Every source gives the same interface (SampleSet): inputs for a
batch of row ids, and the labels as CSR.

Labels of a row list its fine class first, then the fine class's ancestors; a row that shows objects of several
verticals (OpenImages' rows do) lists each object's class and ancestors in turn. Every vertical a row has a label in
routes the row to that vertical's teacher (SampleSet.vertical_lists); SampleSet.verticals is the first label's.

Validation: synthetic data has its own val/ split; real data reads data.path/val/ when it exists, else holds out a
seeded share of train/ (open_real_split).
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

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
        """The vertical of each row's first label."""
        return taxonomy.vertical_of[self.labels.fine()]

    def vertical_lists(self, taxonomy: Taxonomy) -> Labels:
        """The verticals each row has a label in, as CSR rows, in the order of the row's labels (first: the first
        label's vertical). A vertical's position in its row's list is the row's slot for that teacher's targets."""
        key = (id(taxonomy), taxonomy.num_classes)
        if getattr(self, "_vertical_lists", (None,))[0] != key:
            lab = self.labels
            M = taxonomy.num_verticals
            row = np.repeat(np.arange(len(lab), dtype=np.int64), np.diff(lab.indptr))
            pair = row * M + taxonomy.vertical_of[lab.indices]
            _, first = np.unique(pair, return_index=True)  # each (row, vertical) once, at its first label
            first = np.sort(first)
            counts = np.bincount(row[first], minlength=len(lab))
            self._vertical_lists = (key, Labels(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                                                (pair[first] % M).astype(np.int32)))
        return self._vertical_lists[1]

    def rows_of_vertical(self, taxonomy: Taxonomy, vertical: int) -> Tuple[np.ndarray, np.ndarray]:
        """(rows with a label in the vertical, ascending; each row's slot: the vertical's position in its list)."""
        vl = self.vertical_lists(taxonomy)
        at = np.flatnonzero(vl.indices == vertical)
        rows = np.searchsorted(vl.indptr, at, side="right") - 1
        return rows, at - vl.indptr[rows]


class Subset(SampleSet):
    """Some rows of another split, in ascending order (a hold-out of train for validation, and the rest)."""

    def __init__(self, base: SampleSet, rows: np.ndarray):
        self.base, self.rows = base, np.sort(np.asarray(rows, dtype=np.int64))
        ptr, ind = base.labels.rows(self.rows)
        self.labels = Labels(ptr.astype(np.int64), ind.astype(np.int32))
        self.input_shape = base.input_shape

    def inputs(self, idx: np.ndarray) -> torch.Tensor:
        return self.base.inputs(self.rows[np.asarray(idx, dtype=np.int64)])


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
        self._rows = None  # every row's features, once read (IN_MEMORY_BYTES)

    # a split of at most this many bytes of float32 features is read into memory at its first use: a training
    # step then takes its rows with one indexing call instead of a search and a read per shard (the default
    # preset's 102,000 training rows are 26 MB)
    IN_MEMORY_BYTES = 256 << 20

    def inputs(self, idx: np.ndarray) -> torch.Tensor:
        idx = np.asarray(idx, dtype=np.int64)
        if self._rows is None and len(self) * self.input_shape[0] * 4 <= self.IN_MEMORY_BYTES:
            self._rows = torch.from_numpy(self._read(np.arange(len(self), dtype=np.int64)))
        if self._rows is not None:
            if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
                raise IndexError(f"row ids must lie in [0, {len(self)}), got {idx.min()}..{idx.max()}")
            return self._rows[torch.from_numpy(idx)]
        return torch.from_numpy(self._read(idx))

    def _read(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), self.input_shape[0]), dtype=np.float32)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        for s in np.unique(shard):
            m = shard == s
            local = idx[m] - self.starts[s]
            order = np.argsort(local)  # sorted reads are kinder to a memmap
            rows = np.asarray(self.features[s][local[order]], dtype=np.float32)
            out[np.flatnonzero(m)[order]] = rows
        return out


class ShardWriter:
    """Writes rows as shards, one chunk at a time, so a split of any size never sits in memory. The directory must
    hold no shards yet: shards already there are refused, never deleted (kc writes a split into a fresh folder)."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        found = glob.glob(os.path.join(directory, "shard-*")) + glob.glob(os.path.join(directory, "index.json"))
        if found:
            raise DataError(f"{directory} already holds shards ({os.path.basename(sorted(found)[0])}, ...); write "
                            "into a new folder")
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


def open_split(kind: str, directory: str, taxonomy: Taxonomy, image_size: int = 32) -> SampleSet:
    if kind in ("synthetic", "features"):
        return FeatureShards(directory, taxonomy.num_classes)
    if kind == "images":
        return ImageFolder(directory, taxonomy, image_size)
    raise DataError(f"unknown data kind {kind!r}")


def held_out_rows(n: int, fraction: float, seed: int) -> np.ndarray:
    """The rows of a train split of n rows held out for validation: a share `fraction`, drawn by the run's seed
    (ascending)."""
    k = int(round(fraction * n))
    return np.sort(np.random.default_rng([seed, 41]).permutation(n)[:k])


def open_real_split(kind: str, root: str, name: str, taxonomy: Taxonomy, image_size: int, val_fraction: float,
                    seed: int) -> Optional[SampleSet]:
    """Split `name` (train, val or test) of real data under root. With a root/val/ folder the three folders are
    the splits. Without one, val is the share val_fraction of root/train/ drawn by the seed, and train is the rest
    of it; None for val when val_fraction is 0."""
    has_val = os.path.isdir(os.path.join(root, "val"))
    if name == "test" or has_val:
        return open_split(kind, os.path.join(root, name), taxonomy, image_size)
    full = open_split(kind, os.path.join(root, "train"), taxonomy, image_size)
    held = held_out_rows(len(full), val_fraction, seed)
    if name == "val":
        return Subset(full, held) if len(held) else None
    if not len(held):
        return full
    keep = np.ones(len(full), dtype=bool)
    keep[held] = False
    return Subset(full, np.flatnonzero(keep))


def fingerprint(data: SampleSet) -> str:
    """A cheap identity of a split (size and labels), to tie a teacher cache to the rows it was computed on."""
    import hashlib

    h = hashlib.sha256()
    h.update(np.asarray(len(data)).tobytes())
    h.update(np.ascontiguousarray(data.labels.indptr).tobytes())
    h.update(np.ascontiguousarray(data.labels.indices).tobytes())
    return h.hexdigest()[:16]
