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

Two draws give those distributions and counts. ``sample_candidates`` draws on the host with a torch.Generator (it
loops until enough distinct ids appeared). ``draw_in_graph`` draws on the device from a ``PhiloxGenerator`` the
caller owns, with torch ops of fixed shapes only, so that torch.compile traces it into the step's graph: draws with
replacement by the inverse CDF, unique draws by the Gumbel-top-k trick and the number of tries by its geometric
waits (see ``draw_in_graph``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

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


def _log_uniform_ids(u: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse CDF of the Zipf law: floor(exp(u * log(V + 1))) - 1 lies in [0, V) for u in [0, 1)."""
    k = torch.floor(torch.exp(u * math.log(num_classes + 1.0))).long() - 1
    return k.clamp_(0, num_classes - 1)


def _draw(sampler: str, n: int, num_classes: int, probs: Optional[torch.Tensor], generator) -> torch.Tensor:
    if sampler == "log_uniform":
        return _log_uniform_ids(torch.rand(n, dtype=torch.float64, generator=generator), num_classes)
    if sampler == "uniform":
        return torch.randint(0, num_classes, (n,), generator=generator)
    return torch.multinomial(probs, n, replacement=True, generator=generator)


@dataclass
class Candidates:
    ids: torch.Tensor  # [S] int64
    num_tries: Union[int, torch.Tensor]  # a float64 scalar tensor from draw_in_graph
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
        if unique and isinstance(self.num_tries, torch.Tensor):  # no host read: the same test as a select
            tries = self.num_tries.to(p.device)
            return torch.where(tries == num_sampled, num_sampled * p, -torch.expm1(tries * torch.log1p(-p)))
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


# ------------------------------------------------------------------------------------------ drawing inside the graph
# Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011; the generator
# of cuRAND and of torch's CUDA RNG) in int64 torch ops. It is counter-based: block i of a stream is a pure function
# of (key, counter + i), so a draw is elementwise work of fixed shape that any device runs and dynamo traces, and
# its whole state is two integers. 32-bit words live in int64 tensors; products are taken in 16-bit halves so that
# none passes 2^63 (int64 overflow is not defined behaviour for every torch backend).
_M32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key increments (golden ratio, sqrt(3) - 1)
_PHILOX_ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b, a a 32-bit constant, b 32-bit words."""
    a1, a0 = a >> 16, a & 0xFFFF
    b1, b0 = b >> 16, b & 0xFFFF
    low = a0 * b0
    mid = a0 * b1 + a1 * b0 + (low >> 16)  # < 2^34
    return a1 * b1 + (mid >> 16), ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32(counter: Tuple[torch.Tensor, ...], key: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Philox-4x32-10 of counter words (c0, c1, c2, c3) under key words (k0, k1): four 32-bit words per element,
    as int64 tensors (the words broadcast)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(_PHILOX_ROUNDS):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _M32, (k1 + _PHILOX_W[1]) & _M32
        hi0, lo0 = _mulhilo(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


class PhiloxGenerator:
    """The random state of ``draw_in_graph``: ``state``, an int64 tensor [2] (seed, counter) on the device that
    draws, owned by the caller like any buffer (keep it in a module, checkpoint it, reset it). A draw of n uniforms
    reads blocks counter .. counter + ceil(n / 2) - 1 (two uniforms per block) and advances the counter by as many,
    in place, so that consecutive draws are one stream. The seed is the Philox key (0 <= seed < 2^63)."""

    def __init__(self, seed: int = 0, device=None, *, state: Optional[torch.Tensor] = None):
        """A new stream of ``seed`` on ``device``, or with ``state`` one that reads and advances that tensor (an
        int64 [2], e.g. a module's buffer, so that state_dict and .to(device) carry it)."""
        if state is not None:
            if state.dtype != torch.int64 or tuple(state.shape) != (2,):
                raise ValueError(f"state must be an int64 tensor [2] (seed, counter), got {state.dtype} "
                                 f"{tuple(state.shape)}")
            self.state = state
            return
        if isinstance(seed, bool) or int(seed) != seed or not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        self.state = torch.tensor([int(seed), 0], dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.state.device

    def uniform(self, n: int) -> torch.Tensor:
        """n float64 uniforms in (0, 1), on the state's device; advances the counter."""
        blocks = (n + 1) // 2
        seed, counter = self.state[0], self.state[1]
        index = counter + torch.arange(blocks, dtype=torch.int64, device=self.state.device)
        zero = torch.zeros((), dtype=torch.int64, device=self.state.device)
        w = philox4x32((index & _M32, (index >> 32) & _M32, zero, zero), (seed & _M32, (seed >> 32) & _M32))
        # 52 random bits per uniform from two words; (k + 0.5) / 2^52 is exact in float64, never 0 nor 1
        bits = torch.stack([(w[0] << 20) | (w[1] >> 12), (w[2] << 20) | (w[3] >> 12)], dim=1).reshape(-1)[:n]
        self.state[1:] += blocks
        return (bits.to(torch.float64) + 0.5) * 2.0 ** -52

    def __repr__(self) -> str:
        return f"PhiloxGenerator(state={self.state.tolist()}, device={self.device})"


def uniforms_needed(num_sampled: int, num_classes: int, unique: bool) -> int:
    """How many uniforms ``draw_in_graph`` takes: one per draw with replacement; for unique sampling one Gumbel key
    per class and one geometric wait between consecutive distinct ids."""
    return num_classes + num_sampled - 1 if unique else num_sampled


def candidates_from_uniforms(sampler: str, num_sampled: int, num_classes: int, u: torch.Tensor, *, unique: bool,
                             probs: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ids [..., S] int64, num_tries [...] float64) from uniforms u [..., uniforms_needed(...)] (leading dims are
    independent draws): ``draw_in_graph``'s math, with the distribution of ``sample_candidates``.

    With replacement, id = the inverse CDF of u, and num_tries = S. Unique sampling keeps the first S distinct ids of
    an i.i.d. stream, in order; that ordered set is a draw without replacement, each pick proportional to p among
    the classes not yet picked, which is what the S largest of log p + Gumbel noise give, in decreasing order (the
    Gumbel-top-k trick). The number of tries follows from the same ordered set: with the first i ids picked
    (probability mass P_i), the repeats before the next new id are geometric, P(f) = P_i^f (1 - P_i), drawn as
    floor(log u / log P_i); so num_tries = S + those S - 1 waits, distributed as the host loop's count."""
    if sampler == "unigram":
        if probs is None:
            raise ValueError("probs: the unigram sampler needs its class probabilities (class_probabilities)")
        p = probs
    else:
        p = probability(sampler, torch.arange(num_classes, device=u.device), num_classes)
    if not unique:
        if sampler == "log_uniform":
            ids = _log_uniform_ids(u, num_classes)
        elif sampler == "uniform":
            ids = torch.floor(u * num_classes).long().clamp_(max=num_classes - 1)
        else:
            cdf = torch.cumsum(p, 0)
            # the first class whose cumulative mass exceeds u: classes of probability 0 are never that class
            ids = torch.searchsorted(cdf, (u * cdf[-1]).contiguous(), right=True).clamp_(max=num_classes - 1)
        return ids, torch.full(u.shape[:-1], float(num_sampled), dtype=torch.float64, device=u.device)
    keys = torch.log(p) - torch.log(-torch.log(u[..., :num_classes]))
    ids = torch.topk(keys, num_sampled, dim=-1, sorted=True).indices
    seen = torch.cumsum(p[ids], dim=-1)[..., :-1]  # P_1 .. P_{S-1}
    # log P_i < 0 while any mass is left; the clamp keeps rounding at P_i ~ 1 from giving 0 or a negative wait
    waits = torch.floor(torch.log(u[..., num_classes:]) / torch.log(seen).clamp(max=-1e-300))
    return ids, num_sampled + waits.sum(dim=-1)


def draw_in_graph(sampler: str, num_sampled: int, num_classes: int, generator: PhiloxGenerator, *,
                  unique: bool = True, class_counts: Optional[torch.Tensor] = None,
                  distortion: float = 1.0) -> Candidates:
    """``sample_candidates``' distribution and expected counts, drawn on ``generator``'s device with torch ops of
    fixed shapes (no host read, no data-dependent loop), so that it runs inside a compiled graph. Unique sampling
    costs O(V) there (a Gumbel key per class and a top-k), not the host loop's O(draws + V) with a host sync."""
    probs = None
    if sampler == "unigram":
        probs = class_probabilities(sampler, num_classes, class_counts=class_counts, distortion=distortion,
                                    device=generator.device)
    elif sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    u = generator.uniform(uniforms_needed(num_sampled, num_classes, unique))
    ids, num_tries = candidates_from_uniforms(sampler, num_sampled, num_classes, u, unique=unique, probs=probs)
    return Candidates(ids, num_tries, probs, sampler, num_classes)
