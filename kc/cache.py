"""Teacher cache: each specialist runs once over its vertical's training samples; the top-K probabilities inside
the vertical are kept as sparse rows (int32 class id, fp16 value; -1 pads) in two memmapped .npy files.

A row with labels in several verticals is a sample of each: every one of those verticals' teachers scores it and
writes its top-K into the row's slot for that vertical (slot j = columns [j K, (j + 1) K), j the vertical's
position among the row's labelled verticals), so the arrays are [N, slots K], slots the most verticals a row has
(1 for data whose rows each lie in one vertical: the layout of a cache written before rows could span verticals).

A manifest (JSON) records what the cache was computed from: the teachers' checksums, K, the sizes and the
training data's fingerprint. Student training streams rows from the memmaps and refuses a cache whose manifest
does not match what it is about to train with. The cache is filled vertical by vertical and the manifest lists
the finished ones, so an interrupted build continues where it stopped.
A complete cache's manifest also records the size and SHA-256 of both arrays: a truncated or corrupted array is
refused with its name, never streamed.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from kc import checkpoint
from kc.data import SampleSet
from kc.models import Specialist
from kc.taxonomy import Taxonomy

FORMAT = 1
INDEX_FILE, VALUE_FILE, MANIFEST_FILE = "index.npy", "value.npy", "manifest.json"
CACHE_NAMES = re.compile(r"(index|value)\.npy")
IDENTITY_KEYS = ("format", "top_k", "slots", "num_samples", "num_classes", "segments", "teachers", "data")
LEGACY = {"slots": 1}  # a manifest written before the key existed describes this


class CacheMismatch(RuntimeError):
    """The cache on disk was computed from other teachers, data or settings than the ones in use."""


class CacheDamaged(CacheMismatch, checkpoint.DamagedFile):
    """A cache file is truncated or corrupted; the message names it."""


def _file_info(path: str) -> Dict:
    return {"bytes": os.path.getsize(path), "sha256": checkpoint.file_sha256(path)}


def _reserve(path: str) -> None:
    """Allocates the blocks of a fresh memmapped array now, so a full disk is an error here (naming the file)
    instead of a SIGBUS on the first write into an unbacked page."""
    try:
        with open(path, "r+b") as f:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    except OSError as e:
        raise checkpoint.write_error(path, e) from e


def expected_manifest(taxonomy: Taxonomy, train: SampleSet, top_k: int, teacher_checksums: List[str],
                      data_fingerprint: str) -> Dict:
    slots = int(np.diff(train.vertical_lists(taxonomy).indptr).max(initial=1))
    return {"format": FORMAT, "top_k": int(top_k), "slots": slots, "num_samples": len(train),
            "num_classes": taxonomy.num_classes, "segments": taxonomy.segments.tolist(),
            "teachers": list(teacher_checksums), "data": data_fingerprint}


def _mismatch(found: Dict, expected: Dict) -> List[str]:
    out = []
    for k in IDENTITY_KEYS:
        if found.get(k, LEGACY.get(k)) != expected[k]:
            if k == "teachers":
                bad = [i for i, (a, b) in enumerate(zip(found.get(k) or [], expected[k])) if a != b]
                out.append(f"teachers (checksums differ for verticals {bad or 'count'})")
            elif k == "segments":
                out.append("segments (another taxonomy)")
            else:
                out.append(f"{k} (cache {found.get(k)!r}, expected {expected[k]!r})")
    return out


def build(directory: str, teachers: List[Specialist], taxonomy: Taxonomy, train: SampleSet, expected: Dict,
          batch_size: int = 1024, device: str = "cpu", progress: Optional[Callable] = None) -> Dict:
    """Writes (or finishes) the cache in directory; returns the manifest."""
    os.makedirs(directory, exist_ok=True)
    mpath = os.path.join(directory, MANIFEST_FILE)
    K, N = expected["top_k"], len(train)
    W = K * expected["slots"]
    manifest = None
    if os.path.exists(mpath):
        found = checkpoint.read_json(mpath)
        if not _mismatch(found, expected) and os.path.exists(os.path.join(directory, INDEX_FILE)):
            manifest = found  # same identity: continue it
    fresh = manifest is None
    if fresh:
        manifest = dict(expected, verticals_done=[], complete=False)
    ipath, vpath = os.path.join(directory, INDEX_FILE), os.path.join(directory, VALUE_FILE)
    if not fresh:
        try:
            index = np.lib.format.open_memmap(ipath, mode="r+")
            value = np.lib.format.open_memmap(vpath, mode="r+")
            if index.shape != (N, W) or value.shape != (N, W):
                raise ValueError("shape")
        except (ValueError, OSError):  # arrays damaged or missing: start over
            fresh, manifest = True, dict(expected, verticals_done=[], complete=False)
    if fresh:
        try:
            index = np.lib.format.open_memmap(ipath, mode="w+", dtype=np.int32, shape=(N, W))
            value = np.lib.format.open_memmap(vpath, mode="w+", dtype=np.float16, shape=(N, W))
        except OSError as e:
            raise checkpoint.write_error(directory, e) from e
        _reserve(ipath)
        _reserve(vpath)
        if W > K:  # slots a row has no vertical for stay padding (one slot: every row's is written below)
            for s in range(0, N, 65536):
                index[s:s + 65536] = -1
        checkpoint.write_json(mpath, manifest)  # identity first: a half-built cache is never taken for another
    todo = [v for v in range(taxonomy.num_verticals) if v not in manifest["verticals_done"]]
    routed = {v: train.rows_of_vertical(taxonomy, v) for v in todo}  # (rows, slots): every row labelled in v
    bar = (progress(total=sum(len(r) for r, _ in routed.values()), desc="teacher cache", unit="sample")
           if progress else None)
    for v in todo:
        rows, slots = routed[v]
        first = int(taxonomy.segments[v])
        k = min(K, len(taxonomy.classes_of(v)))
        teacher = teachers[v]
        with torch.no_grad():
            for s in range(0, len(rows), batch_size):
                idx, slot = rows[s:s + batch_size], slots[s:s + batch_size]
                prob = torch.sigmoid(teacher(train.inputs(idx).to(device)).float())
                top_v, top_i = prob.topk(k, dim=1)
                cols = slot[:, None] * K + np.arange(K)  # the row's slot for this vertical
                pad_i = np.full((len(idx), K), -1, dtype=np.int32)
                pad_v = np.zeros((len(idx), K), dtype=np.float16)
                pad_i[:, :k] = (top_i + first).cpu().numpy()
                pad_v[:, :k] = top_v.cpu().numpy()
                index[idx[:, None], cols] = pad_i
                value[idx[:, None], cols] = pad_v
                if bar is not None:
                    bar.update(len(idx))
                checkpoint.crash_point()
        index.flush()
        value.flush()
        manifest["verticals_done"] = sorted(manifest["verticals_done"] + [v])
        checkpoint.write_json(mpath, manifest)
    if bar is not None:
        bar.close()
    del index, value
    manifest["files"] = {INDEX_FILE: _file_info(ipath), VALUE_FILE: _file_info(vpath)}
    manifest["complete"] = True
    checkpoint.write_json(mpath, manifest)
    return manifest


class TeacherCache:
    """Streams cached soft targets by training row: batch(idx) -> (index [B, K] int64, value [B, K] float32)."""

    def __init__(self, directory: str, expected: Optional[Dict] = None):
        mpath = os.path.join(directory, MANIFEST_FILE)
        if not os.path.exists(mpath):
            raise FileNotFoundError(f"{directory}: no teacher cache (manifest.json); run `kc cache` first")
        self.manifest = checkpoint.read_json(mpath)
        if not self.manifest.get("complete"):
            raise CacheMismatch(f"{directory}: the teacher cache is incomplete (verticals done: "
                                f"{self.manifest.get('verticals_done')}); run `kc cache` to finish it")
        if expected is not None:
            bad = _mismatch(self.manifest, expected)
            if bad:
                raise CacheMismatch(f"{directory}: the teacher cache does not match this run: " + "; ".join(bad)
                                    + ". Rebuild it with `kc cache`.")
        files = self.manifest.get("files")
        if not isinstance(files, dict) or set(files) != {INDEX_FILE, VALUE_FILE}:
            raise CacheDamaged(f"{mpath}: the manifest does not list the digests of {INDEX_FILE} and {VALUE_FILE}; "
                               "rebuild the cache with `kc cache --out ...`")
        for name in (INDEX_FILE, VALUE_FILE):
            try:
                checkpoint.listed_file(directory, name, files[name], mpath, CACHE_NAMES)
            except ValueError as e:
                raise CacheDamaged(f"teacher cache file {e}; rebuild the cache with `kc cache --out ...`") from None
        arrays = []
        for name in (INDEX_FILE, VALUE_FILE):
            p = os.path.join(directory, name)
            try:
                arrays.append(np.load(p, mmap_mode="r", allow_pickle=False))
            except (ValueError, OSError) as e:
                raise CacheDamaged(f"{p}: unreadable teacher cache file ({e}); rebuild it with `kc cache`") from None
        self.index, self.value = arrays
        self._held = None  # both arrays as tensors, once read (IN_MEMORY_BYTES)
        n, k = self.manifest["num_samples"], self.manifest["top_k"] * self.manifest.get("slots", 1)
        if self.index.shape != (n, k) or self.value.shape != (n, k):
            raise CacheMismatch(f"{directory}: arrays of shape {self.index.shape}/{self.value.shape}, manifest "
                                f"says ({n}, {k})")
        if self.index.dtype != np.int32 or self.value.dtype != np.float16:
            raise CacheDamaged(f"{directory}: arrays of dtype {self.index.dtype}/{self.value.dtype}, a cache holds "
                               "int32/float16")

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    @property
    def width(self) -> int:
        """Targets a row holds: top_k for each of the slots (verticals a row may have labels in)."""
        return self.index.shape[1]

    # a cache of at most this many bytes is read into memory at its first batch: a training step then takes its
    # rows with one indexing call instead of a sort and two memmap reads (the default preset's cache is 58 MB)
    IN_MEMORY_BYTES = 512 << 20

    def batch(self, idx: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(idx)
        if self._held is None and self.index.nbytes + self.value.nbytes <= self.IN_MEMORY_BYTES:
            self._held = (torch.from_numpy(np.array(self.index)), torch.from_numpy(np.array(self.value)))
        if self._held is not None:
            at = torch.from_numpy(idx.astype(np.int64, copy=False))
            return self._held[0][at].long(), self._held[1][at].float()
        order = np.argsort(idx)
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        i = np.asarray(self.index[idx[order]])[inv]
        v = np.asarray(self.value[idx[order]])[inv]
        return torch.from_numpy(i.astype(np.int64)), torch.from_numpy(v.astype(np.float32))
