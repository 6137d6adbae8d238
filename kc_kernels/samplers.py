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


def class_probabilities(sampler: str, num_classes: int, *, class_counts: Optional[torch.Tensor] = None,
                        distortion: float = 1.0, device=None) -> torch.Tensor:
    """P(k) for every class, float64 [V]."""
    if sampler == "log_uniform":
        k = torch.arange(num_classes, dtype=torch.float64, device=device)
        return (torch.log1p(1.0 / (k + 1.0))) / math.log(num_classes + 1.0)
    if sampler == "uniform":
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64, device=device)
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
    probs: torch.Tensor  # [V] float64, the sampler's distribution

    def expected_count(self, classes: torch.Tensor, num_sampled: int, unique: bool) -> torch.Tensor:
        """TensorFlow's expected number of times each of ``classes`` (any shape, -1 allowed) is sampled."""
        p = self.probs.to(classes.device)[classes.long().clamp(min=0)]
        if unique and self.num_tries != num_sampled:
            return -torch.expm1(self.num_tries * torch.log1p(-p))
        return num_sampled * p


def sample_candidates(sampler: str, num_sampled: int, num_classes: int, *, unique: bool = True,
                      class_counts: Optional[torch.Tensor] = None, distortion: float = 1.0,
                      generator: Optional[torch.Generator] = None) -> Candidates:
    """Draw num_sampled candidate ids (on CPU; the op moves them)."""
    probs = class_probabilities(sampler, num_classes, class_counts=class_counts, distortion=distortion)
    if not unique:
        return Candidates(_draw(sampler, num_sampled, num_classes, probs, generator), num_sampled, probs)
    if num_sampled > num_classes:
        raise ValueError(f"num_sampled ({num_sampled}) exceeds the number of classes ({num_classes}) with unique sampling")
    if sampler == "unigram" and int((probs > 0).sum()) < num_sampled:
        raise ValueError("class_counts has fewer non-zero classes than num_sampled")
    draws = torch.empty(0, dtype=torch.long)
    block = max(2 * num_sampled, 64)
    while True:
        draws = torch.cat([draws, _draw(sampler, block, num_classes, probs, generator)])
        uniq, inverse = torch.unique(draws, return_inverse=True)
        if len(uniq) >= num_sampled:
            break
        block *= 2
    # position of each id's first occurrence; keep the first num_sampled distinct ids in draw order
    first = torch.full((len(uniq),), len(draws), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(draws)), reduce="amin")
    order = torch.argsort(first)[:num_sampled]
    num_tries = int(first[order[-1]]) + 1
    return Candidates(uniq[order], num_tries, probs)
