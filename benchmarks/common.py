"""Shared pieces of kc's benchmarks: the cases, their inputs, the GEMM floor, timing and peak memory.

Every op row is timed next to its *floor* on the same device in the same run: the three GEMMs that no fused
implementation can avoid (logits x W^T, dx = G W, dW = G^T x, over all V classes). ``ratio`` = op / floor.

Peak memory is what the timed call adds above what was resident before it:
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before;
- CPU: the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) minus the resident
  set before the call: every byte the call makes resident (tensors, BLAS scratch, the gradients it returns); the
  scratch kc keeps between calls is dropped before, so that it counts.
``extra_mb`` is that peak less the gradients the call returns (dx, dW, dbias), which every implementation must
produce: the working memory of the implementation itself.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

import kc_kernels
from kc_kernels import host_buffers, layout

SHAPES = {
    # name: (B, H, V)
    "small": [(256, 128, 10_000)],
    "paper": [(256, 512, 100_000), (1024, 512, 100_000), (4096, 512, 100_000)],
    "llm": [(8192, 4096, 128_256)],  # an LLM vocabulary; GPU only
}
LOSSES = ("sigmoid-k100", "softmax-kl-dense", "softmax-ce-hard")


@dataclass
class Row:
    case: str
    shape: str
    impl: str
    ms: float = math.nan
    ms_min: float = math.nan
    peak_mb: float = math.nan
    extra_mb: float = math.nan
    floor_ms: float = math.nan
    note: str = ""
    round_ratio: float = math.nan  # median of per-round op / floor ratios, where timed in interleaved rounds
    rounds_ms: List[float] = field(default_factory=list)  # every timed round, in order
    round_ratios: List[float] = field(default_factory=list)  # op / floor of every round

    @property
    def ratio(self) -> float:
        if self.round_ratio == self.round_ratio:
            return self.round_ratio
        return self.ms / self.floor_ms if self.floor_ms == self.floor_ms and self.floor_ms > 0 else math.nan

    def as_dict(self) -> Dict:
        return {"case": self.case, "shape": self.shape, "impl": self.impl, "median_ms": self.ms,
                "min_ms": self.ms_min, "peak_mb": self.peak_mb, "extra_mb": self.extra_mb, "floor_ms": self.floor_ms,
                "ratio": self.ratio, "ratio_q25": quantile(self.round_ratios, 0.25),
                "ratio_q75": quantile(self.round_ratios, 0.75), "rounds_ms": self.rounds_ms,
                "round_ratios": self.round_ratios, "note": self.note}


def quantile(values: List[float], q: float) -> float:
    """Linear-interpolated quantile of ``values`` (nan when empty)."""
    if not values:
        return math.nan
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


# ----------------------------------------------------------------------------------------------- measurement

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _nbytes(out) -> int:
    if isinstance(out, torch.Tensor):
        if out.is_sparse:
            return _nbytes(out._values()) + _nbytes(out._indices())
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(o) for o in out)
    return 0


def _release_free_memory() -> None:
    """Hand the allocator's free pages back to the system (glibc malloc_trim), so that memory an earlier call
    freed but kept resident does not hide this call's working memory from the resident-set measurement."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object], device: torch.device) -> Tuple[float, float]:
    """(peak MiB one call of ``fn`` adds, MiB of the tensors it returns); see the module docstring."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return peak / 2 ** 20, _nbytes(out) / 2 ** 20
    # kc keeps host buffers between calls (a scratch buffer, the memory of its last large gradient outputs): dropped
    # first, so that the measured call allocates them again and they count as any implementation's memory does
    host_buffers.release_host_buffers()
    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return math.nan, math.nan
    base = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM") - base
    return peak / 1024, _nbytes(out) / 2 ** 20


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    return peak_memory(fn, device)[0]


# ----------------------------------------------------------------------------------------------- inputs

@dataclass
class Problem:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    kwargs: Dict = field(default_factory=dict)
    labels: Optional[torch.Tensor] = None


def make_problem(loss: str, B: int, H: int, V: int, device, dtype=torch.float32, K: int = 100, seed: int = 0,
                 on_device: bool = False) -> Problem:
    """Inputs of one benchmark case. ``on_device`` draws them with the device's generator: at LLM shapes (a
    [8192, 128256] teacher) drawing on the host and copying takes longer than the measurement itself."""
    gdev = device if on_device else "cpu"
    g = torch.Generator(device=gdev).manual_seed(seed)

    def draw(fn, *shape, dt=torch.float32):
        return fn(*shape, generator=g, device=gdev).to(device, dt)

    x = (draw(torch.randn, B, H) / math.sqrt(H)).to(dtype).requires_grad_()
    w = (draw(torch.randn, V, H) * 0.05).to(dtype).requires_grad_()
    b = torch.zeros(V, dtype=dtype, device=device).requires_grad_()
    labels = torch.randint(0, V, (B,), generator=g, device=gdev).to(device)
    if loss == "sigmoid-k100":
        idx = torch.randint(0, V, (B, K), generator=g, device=gdev).to(device)
        val = draw(torch.rand, B, K)
        kw = dict(mode="sigmoid", target_index=idx, target_value=val)
    elif loss == "softmax-kl-dense":
        kw = dict(mode="softmax", teacher_logits=draw(torch.randn, B, V, dt=dtype), temperature=2.0)
    elif loss == "softmax-ce-hard":
        kw = dict(mode="softmax", target_index=labels[:, None], target_value=torch.ones(B, 1, device=device))
    elif loss in ("kl-teacher-head", "jsd-teacher-head"):  # a teacher head as wide as the student's
        tx = (draw(torch.randn, B, H) / math.sqrt(H)).to(dtype)
        tw = (draw(torch.randn, V, H) * 0.08).to(dtype)
        kw = dict(mode=loss.split("-")[0], beta=0.5, teacher_x=tx, teacher_weight=tw, temperature=2.0)
    else:
        raise ValueError(f"unknown loss {loss!r}")
    return Problem(x, w, b, kw, labels)


def zero_grads(*ts) -> None:
    for t in ts:
        t.grad = None


# ----------------------------------------------------------------------------------------------- callables

def floor_fn(p: Problem) -> Callable[[], object]:
    """The three GEMMs of a fused linear loss, over all classes, on one reused [B, V] buffer."""
    x, w = p.x.detach(), p.weight.detach()
    # rows an odd number of 64-byte lines apart: the fastest layout for BLAS here (a power-of-two row stride, e.g.
    # 8192 fp32 classes, aliases in the caches), so that no implementation beats its floor by layout alone
    ld = layout.padded_row_stride(w.shape[0], x.element_size())
    buf = torch.zeros(x.shape[0], ld, dtype=x.dtype, device=x.device)[:, :w.shape[0]]
    dx = torch.empty_like(x)
    dw = torch.empty_like(w)

    def run():
        torch.mm(x, w.t(), out=buf)
        torch.mm(buf, w, out=dx)
        torch.mm(buf.t(), x, out=dw)
        return None

    return run


def kc_fn(p: Problem, backend: str, memory_budget: Optional[int] = None) -> Callable[[], object]:
    def run():
        zero_grads(p.x, p.weight, p.bias)
        loss = kc_kernels.linear_soft_target_loss(p.x, p.weight, p.bias, backend=backend,
                                                  memory_budget=memory_budget, **p.kwargs)
        loss.backward()
        return (p.x.grad, p.weight.grad, p.bias.grad)

    return run


def eager_loss(p: Problem) -> torch.Tensor:
    """The same loss in plain PyTorch as users write it: nn.Linear logits, then torch's loss function."""
    import torch.nn.functional as F

    logits = F.linear(p.x, p.weight, p.bias).float()
    kw = p.kwargs
    if kw["mode"] == "sigmoid":
        z = torch.zeros_like(logits).scatter_add_(1, kw["target_index"], kw["target_value"].float())
        return F.binary_cross_entropy_with_logits(logits, z, reduction="sum") / logits.shape[0]
    if "teacher_logits" in kw:
        T = kw["temperature"]
        return T * T * F.kl_div(F.log_softmax(logits / T, 1), F.log_softmax(kw["teacher_logits"].float() / T, 1),
                                reduction="batchmean", log_target=True)
    return F.cross_entropy(logits, p.labels)


def eager_fn(p: Problem, compiled: bool = False) -> Callable[[], object]:
    f = torch.compile(eager_loss) if compiled else eager_loss

    def run():
        zero_grads(p.x, p.weight, p.bias)
        f(p).backward()
        return (p.x.grad, p.weight.grad, p.bias.grad)

    return run


def cce_fn(p: Problem, impl: Optional[str] = None) -> Optional[Callable[[], object]]:
    """Apple's Cut Cross-Entropy (hard labels only), when installed. ``impl``: its preset, "cce" (the default,
    which skips gradient entries below a threshold) or "cce_exact"; on CPU only its torch.compile path exists."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    impl = impl or ("cce" if p.x.is_cuda else "torch_compile")

    def run():
        zero_grads(p.x, p.weight, p.bias)
        # older releases take no bias; the benchmark's bias is zero, so the loss is the same without it
        linear_cross_entropy(p.x, p.weight, p.labels, impl=impl).backward()
        return (p.x.grad, p.weight.grad)

    return run


def _liger_loss():
    """Liger-Kernel's fused linear cross-entropy as f(x, weight, labels, bias) -> loss: the autograd Function of
    its ops package (no transformers import), else its nn.Module."""
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as F

        def loss(x, w, labels, bias):
            out = F.apply(x, w, labels, bias)
            return out[0] if isinstance(out, tuple) else out  # newer releases also return z-loss, accuracy, ...

        return loss
    except ImportError:
        pass
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, labels, bias: module(w, x, labels, bias)


def liger_fn(p: Problem) -> Optional[Callable[[], object]]:
    """Liger-Kernel's fused linear cross-entropy (hard labels, GPU), when installed."""
    if not p.x.is_cuda:
        return None
    try:
        loss_fn = _liger_loss()
    except ImportError:
        return None

    def run():
        zero_grads(p.x, p.weight, p.bias)
        loss_fn(p.x, p.weight, p.labels, p.bias).backward()
        return (p.x.grad, p.weight.grad)

    return run


def interleaved(fns: List[Tuple[str, Callable[[], object]]], device, rounds: int) -> Dict[str, List[float]]:
    """Wall time (ms) of every callable in ``rounds`` interleaved rounds: each round calls each one once, the order
    rotated from round to round, so that a drift of the machine's speed (other jobs, clocks, caches) lands on all
    of them alike instead of on whichever ran last. Returns every round's time per name."""
    times: Dict[str, List[float]] = {name: [] for name, _ in fns}
    for r in range(rounds):
        k = r % len(fns)
        for name, fn in fns[k:] + fns[:k]:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def measure_interleaved(case: str, shape: str, floor: Callable[[], object],
                        impls: List[Tuple[str, Optional[Callable[[], object]]]], device, rounds: int,
                        warmup: Dict[str, int] = None, floor_name: str = "gemm-floor",
                        clear: Optional[Callable[[], None]] = None) -> List[Row]:
    """Rows of one case: the floor and every implementation, each warmed up and its peak memory measured alone,
    then all timed together in interleaved rounds (see ``interleaved``). An implementation's ``ratio`` is the median
    of its per-round ratios to the floor timed in the same round; the JSON keeps every round. ``clear`` drops the
    gradients a call left behind, so that the memory measurement does not start with them resident."""
    warmup = warmup or {}
    rows: Dict[str, Row] = {}
    live: List[Tuple[str, Callable[[], object]]] = []
    for name, fn in [(floor_name, floor)] + list(impls):
        row = Row(case, shape, name)
        rows[name] = row
        if fn is None:
            row.note = "not available"
            continue
        try:
            for _ in range(warmup.get(name, 1)):
                fn()
            if clear is not None:
                clear()
            row.peak_mb, out_mb = peak_memory(fn, device)
            row.extra_mb = row.peak_mb - out_mb
        except Exception as e:  # a peer that imports but fails costs its own row, not the case's
            row.note = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
            continue
        live.append((name, fn))
    if live and live[0][0] == floor_name:
        times = interleaved(live, device, rounds)
        base = times[floor_name]
        for name, ts in times.items():
            row = rows[name]
            row.rounds_ms = ts
            row.ms, row.ms_min = statistics.median(ts), min(ts)
            row.floor_ms = statistics.median(base)
            row.round_ratios = [t / f for t, f in zip(ts, base)]
            row.round_ratio = statistics.median(row.round_ratios)
    return list(rows.values())


def format_table(rows: List[Row]) -> str:
    head = f"{'case':<18} {'shape':<27} {'impl':<18} {'median ms':>10} {'min ms':>9} {'peak MB':>9} " \
           f"{'extra MB':>9} {'floor ms':>9} {'ratio':>6} {'q25-q75':>11}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        spread = f"{quantile(r.round_ratios, 0.25):.2f}-{quantile(r.round_ratios, 0.75):.2f}" if r.round_ratios \
            else ""
        lines.append(f"{r.case:<18} {r.shape:<27} {r.impl:<18} {r.ms:>10.1f} {r.ms_min:>9.1f} {r.peak_mb:>9.1f} "
                     f"{r.extra_mb:>9.1f} {r.floor_ms:>9.1f} {r.ratio:>6.2f} {spread:>11}  {r.note}")
    return "\n".join(lines)
