"""The label space: verticals as contiguous class segments, a hierarchy (parent links) inside each vertical.

Labels are multi-label: a sample of a fine class also carries every ancestor of it. Class ids are ordered so that
each vertical is one contiguous range, which is what kc_kernels calls a segment.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np


class TaxonomyError(ValueError):
    """A taxonomy file or spec that does not describe a valid label space."""


@dataclass
class Taxonomy:
    names: List[str]  # class id -> name
    vertical_names: List[str]  # vertical id -> name
    segments: np.ndarray  # [M + 1] int64 class offsets; vertical v = [segments[v], segments[v + 1])
    parent: np.ndarray  # [N] int64 parent class id, -1 for roots; a parent lies in its child's vertical

    def __post_init__(self):
        self.segments = np.asarray(self.segments, dtype=np.int64)
        self.parent = np.asarray(self.parent, dtype=np.int64)
        self._validate()
        self.vertical_of = np.repeat(np.arange(self.num_verticals), np.diff(self.segments))
        has_child = np.zeros(self.num_classes, dtype=bool)
        has_child[self.parent[self.parent >= 0]] = True
        self.is_leaf = ~has_child
        self._ancestors = [self._walk_up(c) for c in range(self.num_classes)]

    # ------------------------------------------------------------------ structure
    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def num_verticals(self) -> int:
        return len(self.segments) - 1

    def vertical_sizes(self) -> np.ndarray:
        return np.diff(self.segments)

    def classes_of(self, vertical: int) -> range:
        return range(int(self.segments[vertical]), int(self.segments[vertical + 1]))

    def leaves(self) -> np.ndarray:
        return np.flatnonzero(self.is_leaf)

    def ancestors(self, c: int) -> List[int]:
        """Parent, grandparent, ... of class c (nearest first)."""
        return self._ancestors[c]

    def labels_of(self, c: int) -> List[int]:
        """The multi-label set of a sample of class c: c first, then its ancestors."""
        return [c] + self._ancestors[c]

    def depth(self) -> int:
        return 1 + max((len(a) for a in self._ancestors), default=0)

    def _walk_up(self, c: int) -> List[int]:
        out = []
        p = int(self.parent[c])
        while p >= 0:
            out.append(p)
            p = int(self.parent[p])
        return out

    def _validate(self):
        n = len(self.names)
        if n == 0:
            raise TaxonomyError("taxonomy has no classes")
        if len(set(self.names)) != n:
            dup = sorted({x for x in self.names if self.names.count(x) > 1})[:5]
            raise TaxonomyError(f"duplicate class names: {dup}")
        s = self.segments
        if len(s) < 2 or s[0] != 0 or s[-1] != n or np.any(np.diff(s) <= 0):
            raise TaxonomyError(f"segments must rise strictly from 0 to {n}, got {s.tolist()[:10]}...")
        if len(self.vertical_names) != len(s) - 1:
            raise TaxonomyError("one name per vertical is needed")
        if self.parent.shape != (n,) or np.any(self.parent < -1) or np.any(self.parent >= n):
            raise TaxonomyError("parent must hold one id in [-1, num_classes) per class")
        vert = np.repeat(np.arange(len(s) - 1), np.diff(s))
        bad = np.flatnonzero((self.parent >= 0) & (vert[np.maximum(self.parent, 0)] != vert))
        if len(bad):
            c = int(bad[0])
            raise TaxonomyError(f"class {self.names[c]!r} has parent {self.names[self.parent[c]]!r} "
                                f"in another vertical")
        # cycle check: following parents from any class must reach a root within n steps
        cur = np.arange(n)
        for _ in range(n + 1):
            nxt = np.where(cur >= 0, self.parent[np.maximum(cur, 0)], -1)
            if np.all(nxt < 0):
                break
            cur = nxt
        else:
            c = int(np.flatnonzero(cur >= 0)[0])
            raise TaxonomyError(f"the parent links contain a cycle (through class {self.names[c]!r})")

    # ------------------------------------------------------------------ files
    def to_rows(self) -> List[Dict[str, str]]:
        return [{"class": self.names[c], "vertical": self.vertical_names[self.vertical_of[c]],
                 "parent": self.names[self.parent[c]] if self.parent[c] >= 0 else ""} for c in range(self.num_classes)]

    def save(self, path: str) -> None:
        """Writes the taxonomy as CSV (or JSON for a .json path) atomically: the old file or the whole new one."""
        from kc import checkpoint

        rows = self.to_rows()
        if path.endswith(".json"):
            checkpoint.write_text(path, json.dumps(rows))
            return
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=["class", "vertical", "parent"])
        w.writeheader()
        w.writerows(rows)
        checkpoint.write_text(path, buf.getvalue())

    def summary(self) -> str:
        sizes = self.vertical_sizes()
        return (f"{self.num_classes} classes in {self.num_verticals} verticals (sizes {sizes.min()}-{sizes.max()}), "
                f"{int(self.is_leaf.sum())} leaves, depth {self.depth()}")


def from_rows(rows: Sequence[Dict[str, object]], source: str = "taxonomy") -> Taxonomy:
    """Rows of {class, vertical, parent}; classes are regrouped so each vertical is contiguous (file order kept)."""
    if not rows:
        raise TaxonomyError(f"{source}: no classes")
    names, verts, parents = [], [], []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise TaxonomyError(f"{source}: entry {i} is not a mapping")
        missing = [k for k in ("class", "vertical") if r.get(k) in (None, "")]
        if missing:
            raise TaxonomyError(f"{source}: entry {i} lacks {missing} (need class, vertical, parent)")
        names.append(str(r["class"]))
        verts.append(str(r["vertical"]))
        p = r.get("parent")
        parents.append("" if p is None else str(p))
    vertical_names = list(dict.fromkeys(verts))
    order = sorted(range(len(names)), key=lambda i: vertical_names.index(verts[i]))
    names = [names[i] for i in order]
    index = {}
    for i, n in enumerate(names):
        if n in index:
            raise TaxonomyError(f"{source}: class {n!r} appears twice")
        index[n] = i
    parent = np.full(len(names), -1, dtype=np.int64)
    for new, old in enumerate(order):
        p = parents[old]
        if p:
            if p not in index:
                raise TaxonomyError(f"{source}: class {names[new]!r} names an unknown parent {p!r}")
            parent[new] = index[p]
    counts = [sum(1 for v in verts if v == name) for name in vertical_names]
    segments = np.concatenate([[0], np.cumsum(counts)])
    try:
        return Taxonomy(names, vertical_names, segments, parent)
    except TaxonomyError as e:
        raise TaxonomyError(f"{source}: {e}") from None


def load(path: str) -> Taxonomy:
    """A taxonomy from CSV (header: class,vertical,parent) or JSON (a list of such objects)."""
    if not os.path.exists(path):
        raise TaxonomyError(f"taxonomy file {path} does not exist")
    if not os.path.isfile(path):  # a device or fifo would be read for ever
        raise TaxonomyError(f"taxonomy file {path} is not a regular file")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                rows = json.load(f)
        except json.JSONDecodeError as e:
            raise TaxonomyError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise TaxonomyError(f"{path}: expected a JSON list of {{class, vertical, parent}} objects")
    else:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"class", "vertical"} <= set(reader.fieldnames):
                raise TaxonomyError(f"{path}: CSV header must name class, vertical and parent; "
                                    f"got {reader.fieldnames}")
            rows = list(reader)
    return from_rows(rows, source=path)


def generate(num_verticals: int, num_classes: int, *, coarse_fraction: float = 0.15, size_spread: float = 0.5,
             seed: int = 0) -> Taxonomy:
    """A random two-level taxonomy: per vertical, a few coarse classes, each the parent of several fine classes."""
    if num_classes < 2 * num_verticals:
        raise TaxonomyError(f"need at least 2 classes per vertical, got {num_classes} for {num_verticals}")
    rng = np.random.default_rng([seed, 101])
    w = 1.0 + size_spread * rng.uniform(-1, 1, num_verticals)
    sizes = np.maximum(2, np.floor(w / w.sum() * num_classes).astype(np.int64))
    sizes[np.argmax(sizes)] += num_classes - sizes.sum()  # exact total
    if sizes.min() < 2:
        raise TaxonomyError("vertical sizes too uneven for the class count")
    names, parent, vnames = [], [], []
    offset = 0
    for v, n_v in enumerate(sizes.tolist()):
        vnames.append(f"v{v:02d}")
        n_coarse = max(1, int(round(coarse_fraction * n_v))) if n_v >= 3 else 1
        n_fine = n_v - n_coarse
        for k in range(n_coarse):
            names.append(f"v{v:02d}/c{k:03d}")
            parent.append(-1)
        # every fine class hangs under a coarse one, spread evenly so each coarse class has siblings under it
        owner = np.sort(rng.permutation(np.arange(n_fine) % n_coarse))
        for j in range(n_fine):
            names.append(f"v{v:02d}/c{owner[j]:03d}/f{j:05d}")
            parent.append(offset + int(owner[j]))
        offset += n_v
    return Taxonomy(names, vnames, np.concatenate([[0], np.cumsum(sizes)]), np.array(parent))
