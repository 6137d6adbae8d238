"""A label space from WordNet 3.0's noun hierarchy (data.noun), where ImageNet's classes come from.

The reader follows the data file format of wndb(5WN): after a license header (lines that begin with two spaces)
each line is one synset,

    synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [ptr ...] | gloss

with ptr = `pointer_symbol synset_offset pos source/target`. Only nouns and their hypernym pointers (`@`, and `@i`
for instances) are used: a synset's parents are its hypernyms, its hyponyms are the synsets that name it.

Verticals are disjoint hyponym subtrees: `select_verticals` takes num_verticals synsets whose subtree (every
synset reachable down the hyponym links, along any path) holds between min_size and max_size classes, with sizes
spread over that range, no subtree sharing a synset with another, and the total within max_classes. A vertical is
named after its root synset's first word ("dog", "bird", "dish"); its classes are every synset below the root (the
root itself is the vertical). A synset with several hypernyms lies in at most one vertical (subtrees are disjoint
along every path), and inside it its parent is the hypernym nearest the vertical's root (the first listed on a tie).
"""
from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from kc.taxonomy import Taxonomy, TaxonomyError

DEFAULT_PATH = "/usr/share/wordnet/data.noun"
DEBIAN_PACKAGE = "wordnet-base"


class WordNetError(TaxonomyError):
    """A WordNet file or selection that cannot give the requested label space; the message names the option."""


@dataclass(frozen=True)
class Synset:
    offset: int  # byte offset in data.noun: the synset's id (ImageNet's wnid is "n" + 8 digits of it)
    lex_filenum: int  # lexicographer file (lexnames(5WN)): 5 noun.animal, 6 noun.artifact, 13 noun.food, ...
    words: Tuple[str, ...]  # as entered by the lexicographer, spaces as underscores
    hypernyms: Tuple[int, ...]  # '@' pointers to nouns, file order
    instance_hypernyms: Tuple[int, ...]  # '@i' pointers: this synset is an instance (a proper noun) of those

    @property
    def wnid(self) -> str:
        return f"n{self.offset:08d}"

    @property
    def lemma(self) -> str:
        return self.words[0]


_HEX = frozenset("0123456789abcdefABCDEF")
_POS = frozenset("nvasr")


def _number(token: str, base: int, width: Optional[int], what: str, where: str) -> int:
    if width is not None and len(token) != width:
        raise WordNetError(f"{where}: {what} must have {width} digits, got {token!r}")
    if not (token.isascii() and token.isalnum()):  # no sign, space, '_' or non-ASCII digit
        raise WordNetError(f"{where}: {what} must be unsigned ASCII digits, got {token!r}")
    try:
        return int(token, base)
    except ValueError:
        raise WordNetError(f"{where}: {what} is not a {'hexadecimal' if base == 16 else 'decimal'} number: "
                           f"{token!r}") from None


def parse_line(line: str, where: str = "data.noun") -> Synset:
    """One synset line of a noun data file. `where` names the line in errors (e.g. "data.noun:42")."""
    head, bar, _gloss = line.partition("|")
    if not bar:
        raise WordNetError(f"{where}: no '|' before the gloss")
    tok = head.split()
    if len(tok) < 6:
        raise WordNetError(f"{where}: too few fields for a synset ({len(tok)})")
    offset = _number(tok[0], 10, 8, "synset_offset", where)
    lex_filenum = _number(tok[1], 10, 2, "lex_filenum", where)
    if tok[2] != "n":
        raise WordNetError(f"{where}: ss_type {tok[2]!r} is not a noun ('n'); give the noun data file data.noun")
    w_cnt = _number(tok[3], 16, 2, "w_cnt", where)
    if w_cnt == 0:
        raise WordNetError(f"{where}: a synset needs at least one word (w_cnt 00)")
    i = 4
    if len(tok) < i + 2 * w_cnt + 1:
        raise WordNetError(f"{where}: w_cnt says {w_cnt} words but the line ends early")
    words = []
    for k in range(w_cnt):
        words.append(tok[i + 2 * k])
        _number(tok[i + 2 * k + 1], 16, 1, f"lex_id of word {k + 1}", where)
    i += 2 * w_cnt
    p_cnt = _number(tok[i], 10, 3, "p_cnt", where)
    i += 1
    if len(tok) != i + 4 * p_cnt:
        raise WordNetError(f"{where}: p_cnt says {p_cnt} pointers ({4 * p_cnt} fields) but {len(tok) - i} fields "
                           "follow it before the gloss")
    hyper, inst = [], []
    for k in range(p_cnt):
        symbol, target, pos, st = tok[i + 4 * k: i + 4 * k + 4]
        if not (len(target) == 8 and target.isascii() and target.isdigit() and len(st) == 4
                and _HEX.issuperset(st) and pos in _POS):  # a full check, with its message, only when needed
            _number(target, 10, 8, f"synset_offset of pointer {k + 1}", where)
            _number(st, 16, 4, f"source/target of pointer {k + 1}", where)
            raise WordNetError(f"{where}: pointer {k + 1} has an unknown pos {pos!r}")
        if pos == "n" and symbol == "@":
            hyper.append(int(target))
        elif pos == "n" and symbol == "@i":
            inst.append(int(target))
    return Synset(offset, lex_filenum, tuple(words), tuple(hyper), tuple(inst))


def missing_file_message(path: str, option: str) -> str:
    return (f"{option}: WordNet noun file {path} does not exist; WordNet 3.0's data.noun is in the Debian package "
            f"{DEBIAN_PACKAGE} (`sudo apt-get install {DEBIAN_PACKAGE}` puts it at {DEFAULT_PATH}), or set "
            f"{option} to a copy of it")


def read(path: str = DEFAULT_PATH, option: str = "taxonomy.wordnet_path") -> Dict[int, Synset]:
    """Every synset of a noun data file, by offset. Every hypernym a synset names must be in the file."""
    if not os.path.isfile(path):
        raise WordNetError(missing_file_message(path, option))
    synsets: Dict[int, Synset] = {}
    line_of: Dict[int, int] = {}
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().split("\n")
        except UnicodeDecodeError as e:
            raise WordNetError(f"{option}: {path} is not a text file ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("  "):  # the license header: two spaces and a line number
            continue
        s = parse_line(line, f"{path}:{n}")
        if s.offset in synsets:
            raise WordNetError(f"{path}:{n}: synset {s.offset:08d} already appeared on line {line_of[s.offset]}")
        synsets[s.offset] = s
        line_of[s.offset] = n
    if not synsets:
        raise WordNetError(f"{option}: {path} holds no synsets")
    for s in synsets.values():
        for t in s.hypernyms + s.instance_hypernyms:
            if t not in synsets:
                raise WordNetError(f"{path}:{line_of[s.offset]}: synset {s.offset:08d} ({s.lemma}) names hypernym "
                                   f"{t:08d}, which is not in the file")
    return synsets


class Hierarchy:
    """The hypernym graph of a set of synsets (a DAG: about 2% of nouns have two hypernyms or more).

    instances=False drops instance synsets (proper nouns: "Einstein", "Paris"), as ImageNet does; True keeps them
    under the synsets they are instances of."""

    def __init__(self, synsets: Dict[int, Synset], instances: bool = False):
        self.synsets = {o: s for o, s in synsets.items() if instances or not (s.instance_hypernyms and not s.hypernyms)}
        self.parents: Dict[int, Tuple[int, ...]] = {}
        kids: Dict[int, List[int]] = {o: [] for o in self.synsets}
        for o, s in self.synsets.items():
            ps = s.hypernyms + (s.instance_hypernyms if instances else ())
            ps = tuple(dict.fromkeys(p for p in ps if p in self.synsets))
            self.parents[o] = ps
            for p in ps:
                kids[p].append(o)
        self.children = {o: tuple(sorted(k)) for o, k in kids.items()}
        self._check_acyclic()

    def __len__(self) -> int:
        return len(self.synsets)

    def _check_acyclic(self) -> None:
        order = self.bottom_up()
        if len(order) != len(self.synsets):
            stuck = min(set(self.synsets) - set(order))
            raise WordNetError(f"the hypernym links contain a cycle (through synset {stuck:08d}, "
                               f"{self.synsets[stuck].lemma})")

    def bottom_up(self) -> List[int]:
        """Synsets with every hyponym before its hypernyms (Kahn's order, ties by offset)."""
        pending = {o: len(k) for o, k in self.children.items()}
        ready = sorted(o for o, n in pending.items() if n == 0)
        out = []
        queue = deque(ready)
        while queue:
            o = queue.popleft()
            out.append(o)
            for p in self.parents[o]:
                pending[p] -= 1
                if pending[p] == 0:
                    queue.append(p)
        return out

    def find(self, key: str, option: str = "taxonomy.wordnet_under") -> int:
        """A synset by wnid ("n02084071"), 8-digit offset, or word (the lowest-offset synset whose first word it
        is, case-insensitive; spaces or underscores)."""
        k = key.strip()
        digits = k[1:] if k[:1] in ("n", "N") and k[1:].isdigit() else k
        if digits.isdigit():
            o = int(digits)
            if o not in self.synsets:
                raise WordNetError(f"{option}: no noun synset {o:08d} in the hierarchy")
            return o
        w = k.replace(" ", "_").lower()
        hits = [o for o, s in self.synsets.items() if s.lemma.lower() == w]
        if not hits:
            raise WordNetError(f"{option}: no noun synset has {key!r} as its first word")
        return min(hits)

    def descendants(self, root: int) -> List[int]:
        """Every synset below root along any hyponym path, breadth-first (children by offset), root excluded."""
        seen = {root}
        out = []
        queue = deque([root])
        while queue:
            o = queue.popleft()
            for c in self.children[o]:
                if c not in seen:
                    seen.add(c)
                    out.append(c)
                    queue.append(c)
        return out

    def subtree_sizes(self, limit: int) -> Dict[int, int]:
        """Number of synsets below each synset (its classes as a vertical), for those with at most `limit`; larger
        subtrees are left out (counting them exactly would hold a set per synset of the whole hierarchy)."""
        return {o: len(s) for o, s in self.subtrees(limit).items()}

    def subtrees(self, limit: int) -> Dict[int, frozenset]:
        """The synsets below each synset, along any path, for those with at most `limit` of them."""
        below: Dict[int, Optional[frozenset]] = {}
        for o in self.bottom_up():
            acc = set()
            for c in self.children[o]:
                sub = below[c]
                if sub is None:
                    acc = None
                    break
                acc.add(c)
                acc |= sub
                if len(acc) > limit:
                    acc = None
                    break
            below[o] = None if acc is None else frozenset(acc)
        return {o: s for o, s in below.items() if s is not None}


def size_targets(num_verticals: int, min_size: int, max_size: int, max_classes: int) -> List[float]:
    """Target sizes, largest first: geometric from max_size down to min_size; where they would add up to more
    than max_classes, the top is lowered (bisection) until they fit."""
    if num_verticals * min_size > max_classes:
        raise WordNetError(f"taxonomy.num_classes: {num_verticals} verticals of at least {min_size} classes "
                           f"(taxonomy.vertical_min_classes) need {num_verticals * min_size}, more than the "
                           f"{max_classes} allowed")

    def spread(top: float) -> List[float]:
        if num_verticals == 1:
            return [top]
        return [top * (min_size / top) ** (i / (num_verticals - 1)) for i in range(num_verticals)]

    top = float(max_size)
    if sum(spread(top)) > max_classes:
        lo, hi = float(min_size), float(max_size)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if sum(spread(mid)) <= max_classes else (lo, mid)
        top = lo
    return spread(top)


def select_verticals(h: Hierarchy, num_verticals: int, min_size: int, max_size: int, max_classes: int,
                     under: Optional[int] = None) -> List[int]:
    """Roots of num_verticals disjoint subtrees, each of min_size..max_size classes (synsets below the root).

    Sizes are spread over the range: target sizes run geometrically from max_size down to min_size (from below
    max_size where those would add up to more than max_classes), and for each target in turn the candidate of
    nearest size (in ratio; then the larger, then the lower offset) is taken whose subtree shares no synset with
    those already taken and leaves room within max_classes for min_size classes per vertical still to come. Only
    `under` and the synsets below it are candidates (None: any). Greedy: it may report fewer disjoint subtrees
    than some other choice would find. The same hierarchy and arguments give the same roots."""
    for name, v in (("num_verticals", num_verticals), ("min_size", min_size), ("max_size", max_size),
                    ("max_classes", max_classes)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}: must be a positive integer, got {v!r}")
    if min_size > max_size:
        raise ValueError(f"min_size ({min_size}) exceeds max_size ({max_size})")
    if under is not None and under not in h.synsets:
        raise ValueError(f"under: {under!r} is not a synset offset of the hierarchy")
    below = h.subtrees(max_size)
    sizes = {o: len(s) for o, s in below.items()}
    allowed = None if under is None else set(h.descendants(under)) | {under}
    cands = sorted(o for o, n in sizes.items() if min_size <= n <= max_size and (allowed is None or o in allowed))
    targets = size_targets(num_verticals, min_size, max_size, max_classes)
    taken: List[int] = []
    covered: set = set()
    total = 0
    for i, t in enumerate(targets):
        room = max_classes - total - min_size * (num_verticals - 1 - i)
        ranked = sorted(cands, key=lambda o: (abs(math.log(sizes[o] / t)), -sizes[o], o))
        for o in ranked:
            if sizes[o] > room or o in covered:
                continue
            if not below[o].isdisjoint(covered):  # o above a vertical taken, or sharing a synset with one
                continue
            taken.append(o)
            covered |= below[o]
            covered.add(o)
            total += sizes[o]
            break
        else:
            break
    if len(taken) < num_verticals:
        raise WordNetError(f"taxonomy.num_verticals: only {len(taken)} disjoint subtrees of "
                           f"{min_size}..{max_size} classes (taxonomy.vertical_min_classes, "
                           f"taxonomy.vertical_max_classes) fit within {max_classes} classes "
                           f"(taxonomy.num_classes){'' if under is None else ' within the chosen root'}, "
                           f"against {num_verticals} asked for")
    return taken


def class_name(s: Synset) -> str:
    """A class's name: its first word and its wnid, e.g. 'poodle.n02113799' (unique: the wnid is)."""
    return f"{s.lemma}.{s.wnid}"


def build_taxonomy(h: Hierarchy, roots: Sequence[int]) -> Taxonomy:
    """Verticals in root offset order; each holds every synset below its root, breadth-first. A class's parent is
    its hypernym nearest the root (the first listed on a tie), -1 for the root's own hyponyms."""
    roots = sorted(roots)
    names, vnames, parent, sizes = [], [], [], []
    seen_v: Dict[str, int] = {}
    owner: Dict[int, int] = {}
    for v, r in enumerate(roots):
        vname = h.synsets[r].lemma
        if vname in seen_v:  # two roots with the same first word: the later ones carry their wnid
            vname = class_name(h.synsets[r])
        seen_v[vname] = v
        vnames.append(vname)
        members = h.descendants(r)
        dist = {r: 0}
        for o in members:  # breadth-first: every hypernym on a shortest path from the root is already placed
            dist[o] = 1 + min(dist[p] for p in h.parents[o] if p in dist)
        index = {o: len(names) + k for k, o in enumerate(members)}
        for o in members:
            if o in owner:
                raise WordNetError(f"synset {o:08d} lies below two vertical roots ({roots[owner[o]]:08d} and "
                                   f"{r:08d}); verticals must be disjoint")
            owner[o] = v
            near = [p for p in h.parents[o] if p in dist and dist[p] == dist[o] - 1]
            parent.append(-1 if near[0] == r else index[near[0]])
        names += [class_name(h.synsets[o]) for o in members]
        sizes.append(len(members))
    if not names:
        raise WordNetError("the chosen vertical roots have no hyponyms")
    return Taxonomy(names, vnames, np.concatenate([[0], np.cumsum(sizes)]), np.array(parent, dtype=np.int64))


def taxonomy_from_wordnet(path: str = DEFAULT_PATH, *, num_verticals: int, max_classes: int, min_size: int,
                          max_size: int, under: Optional[str] = None, instances: bool = False) -> Taxonomy:
    """The whole route: read the file, select the verticals, build the label space."""
    h = Hierarchy(read(path), instances=instances)
    root = None if under is None else h.find(under)
    return build_taxonomy(h, select_verticals(h, num_verticals, min_size, max_size, max_classes, under=root))


def describe(tax: Taxonomy) -> List[Tuple[str, int]]:
    """(vertical name, classes) per vertical."""
    return [(n, int(k)) for n, k in zip(tax.vertical_names, tax.vertical_sizes())]


def excerpt_lines(path: str, roots: Iterable[int], max_per_root: Optional[int] = None,
                  instances: bool = False) -> List[str]:
    """Lines of a data file for some subtrees (every synset below each root, instances too if asked, or the first
    max_per_root of them breadth-first) plus every hypernym chain of those synsets up to the top: a connected,
    hypernym-closed slice with the license header (how tests/data/wordnet-excerpt.noun was made). Lines keep
    their file order."""
    syn = read(path)
    h = Hierarchy(syn, instances=instances)
    keep = set()
    for r in roots:
        below = h.descendants(r)
        keep.add(r)
        keep.update(below if max_per_root is None else below[:max_per_root])
    stack = list(keep)
    while stack:  # close under hypernyms (every one, so multiple inheritance keeps its links)
        o = stack.pop()
        for p in syn[o].hypernyms + syn[o].instance_hypernyms:
            if p not in keep:
                keep.add(p)
                stack.append(p)
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):
                out.append(line.rstrip("\n"))
            elif line.strip() and int(line[:8]) in keep:
                out.append(line.rstrip("\n"))
    return out
