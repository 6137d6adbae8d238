"""Candidate samplers of sampled softmax, with TensorFlow's expected counts.

Three distributions over class ids 0..V-1:
- ``log_uniform`` (Zipf): P(k) = (log(k + 2) - log(k + 1)) / log(V + 1), as TensorFlow's
  log_uniform_candidate_sampler; it suits ids sorted by decreasing frequency;
- ``uniform``: P(k) = 1 / V;
- ``unigram``: P(k) proportional to class_counts[k] ** distortion.

With ``unique=True`` (TensorFlow's default) draws are repeated until num_sampled distinct ids are found; the
expected count of a class with probability p is then 1 - (1 - p) ** num_tries, where num_tries is the number of
draws made. Without it, or when unique sampling needed no more than num_sampled draws, the expected count is
num_sampled * p (TensorFlow's ExpectedCountHelper takes that shortcut whenever num_tries == num_sampled). All
randomness comes from ``generator``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

SAMPLERS = ("log_uniform", "uniform", "unigram")


def probability(sampler: str, classes: torch.Tensor, num_classes: int,
                probs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """P(k) of the given classes (any shape, int), float64. log_uniform and uniform use their closed forms, so
    no [V] table is built per call; unigram looks up ``probs`` (from class_probabilities)."""
    if sampler == "log_uniform":
        return torch.log1p(1.0 / (classes.to(torch.float64) + 1.0)) / math.log(num_classes + 1.0)
    if sampler == "uniform":
        return torch.full(classes.shape, 1.0 / num_classes, dtype=torch.float64, device=classes.device)
    return probs.to(classes.device)[classes.long()]


def class_probabilities(sampler: str, num_classes: int, *, class_counts: Optional[torch.Tensor] = None,
                        distortion: float = 1.0, device=None) -> torch.Tensor:
    """P(k) for every class, float64 [V]."""
    if sampler in ("log_uniform", "uniform"):
        return probability(sampler, torch.arange(num_classes, device=device), num_classes)
    if sampler == "unigram":
        w = class_counts.to(device=device, dtype=torch.float64) ** distortion
        return w / w.sum()
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def _draw(sampler: str, n: int, num_classes: int, probs: Optional[torch.Tensor], generator) -> torch.Tensor:
    if sampler == "log_uniform":
        # inverse CDF of the Zipf law: floor(exp(u * log(V + 1))) - 1 lies in [0, V)
        u = torch.rand(n, dtype=torch.float64, generator=generator)
        k = torch.floor(torch.exp(u * math.log(num_classes + 1.0))).long() - 1
        return k.clamp_(0, num_classes - 1)
    if sampler == "uniform":
        return torch.randint(0, num_classes, (n,), generator=generator)
    return torch.multinomial(probs, n, replacement=True, generator=generator)


@dataclass
class Candidates:
    ids: torch.Tensor  # [S] int64
    num_tries: int
    probs: Optional[torch.Tensor] = None  # [V] float64 table (unigram); None: the sampler's closed form
    sampler: str = "unigram"
    num_classes: int = 0

    def expected_count(self, classes: torch.Tensor, num_sampled: int, unique: bool) -> torch.Tensor:
        """TensorFlow's expected number of times each of ``classes`` (any shape, -1 allowed) is sampled."""
        safe = classes.long().clamp(min=0)
        if self.probs is not None:
            p = self.probs.to(classes.device)[safe]
        else:
            p = probability(self.sampler, safe, self.num_classes)
        if unique and self.num_tries != num_sampled:
            return -torch.expm1(self.num_tries * torch.log1p(-p))
        return num_sampled * p


def sample_candidates(sampler: str, num_sampled: int, num_classes: int, *, unique: bool = True,
                      class_counts: Optional[torch.Tensor] = None, distortion: float = 1.0,
                      generator: Optional[torch.Generator] = None) -> Candidates:
    """Draw num_sampled candidate ids (on CPU; the op moves them)."""
    probs = None
    if sampler == "unigram":
        probs = class_probabilities(sampler, num_classes, class_counts=class_counts, distortion=distortion)
    elif sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")

    def found(ids, tries):
        return Candidates(ids, tries, probs, sampler, num_classes)

    if not unique:
        return found(_draw(sampler, num_sampled, num_classes, probs, generator), num_sampled)
    if num_sampled > num_classes:
        raise ValueError(f"num_sampled ({num_sampled}) exceeds the number of classes ({num_classes}) "
                         "with unique sampling")
    if sampler == "unigram" and int((probs > 0).sum()) < num_sampled:
        raise ValueError("class_counts has fewer non-zero classes than num_sampled")
    # Draw in blocks until num_sampled distinct ids appeared; keep the first num_sampled in draw order, which is
    # what drawing one at a time and skipping repeats gives. A draw is the first of its id when the smallest
    # position that id was drawn at (a scatter-min over the [V] classes) is its own: O(draws + V), no sort (np.unique's
    # sorts were most of the cost: docs/performance.md).
    draws = torch.empty(0, dtype=torch.int64)
    block = max(2 * num_sampled, 64)
    while True:
        draws = torch.cat([draws, _draw(sampler, block, num_classes, probs, generator)])
        pos = torch.arange(len(draws))
        first = torch.full((num_classes,), len(draws), dtype=torch.int64)
        first.scatter_reduce_(0, draws, pos, reduce="amin")
        firsts = (first[draws] == pos).nonzero().squeeze(1)  # positions of first occurrences, in draw order
        if len(firsts) >= num_sampled:
            break
        block *= 2
    num_tries = int(firsts[num_sampled - 1]) + 1
    return found(draws[firsts[:num_sampled]], num_tries)
