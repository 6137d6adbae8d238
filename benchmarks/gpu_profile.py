"""Where one call's time goes: one call under torch.profiler, its device kernels split into the GEMMs (logits, dx,
dW), kc's epilogue kernels and the torch kernels (fills, casts, partial sums; the fp32 sums of dx and of dW apart),
with dW's total (its GEMMs and its torch passes).

On a GPU the split is by kernel time (CUDA activities); a GEMM's role comes from the shapes of the aten op that
launched it (x W^T has the hidden size as its inner dimension; dx = G W and dW = G^T x share the hidden size as
their last, and the row/class counts of the last logits GEMM tell them apart). Without a GPU (the dry run) the same
split is made of the CPU ops' own time, and whatever no aten op holds (kc's C++ epilogue, Python) is "other".
"""
from __future__ import annotations

import re
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

# cuBLAS / cuBLASLt / CUTLASS kernel names on Ampere and Hopper (nvjet: cuBLASLt's Hopper kernels)
GEMM_KERNEL = re.compile(r"gemm|cutlass|xmma|nvjet|cublas|gemv|splitk", re.IGNORECASE)
# kc's own kernels: the Triton and CUDA epilogues of the soft-target op, the sampled softmax's kernels
KC_KERNEL = re.compile(r"row_stats|final_kernel|sampled_softmax|soft_target")
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul", "aten::linear")


def kernel_category(name: str) -> str:
    if KC_KERNEL.search(name):
        return "epilogue"
    if GEMM_KERNEL.search(name):
        return "gemm"
    return "torch"


def _mm_dims(op: str, shapes: List) -> Optional[Tuple[int, int, int]]:
    """(m, k, n) of a matrix product op from its recorded input shapes (addmm: bias/out first)."""
    mats = [s for s in shapes if isinstance(s, (list, tuple)) and len(s) == 2]
    if op.startswith("aten::addmm") and len(mats) >= 3:
        mats = mats[1:3]
    if len(mats) < 2:
        return None
    (m, k), (k2, n) = mats[0], mats[1]
    return (m, k, n) if k == k2 else None


class GemmRoles:
    """Tells logits, dx and dW GEMMs apart from their shapes, in launch order (see the module docstring)."""

    def __init__(self, H: int):
        self.H = H
        self.last: Optional[Tuple[int, int]] = None  # (rows, classes) of the last logits GEMM
        self.pending_dx = False

    def role(self, op: str, shapes: List) -> str:
        d = _mm_dims(op, shapes)
        if d is None:
            return "gemm (shape unknown)"
        m, k, n = d
        if k == self.H and n != self.H:
            self.last, self.pending_dx = (m, n), True
            return "gemm logits"
        if n == self.H and self.last is not None:
            rows, classes = self.last
            if (m, k) == (rows, classes) and (rows != classes or self.pending_dx):
                self.pending_dx = False
                return "gemm dx"
            if (m, k) == (classes, rows):
                return "gemm dW"
        if n == self.H:
            return "gemm dx/dW"
        return "gemm (other)"

    def torch_role(self, shapes: List) -> str:
        """A torch kernel over [classes, H] after a logits GEMM is dW's (the fp32 sum over row blocks, its casts);
        over [rows, H] or [B, H], dx's (the fp32 sum over chunks); anything else is "torch"."""
        mats = [s for s in shapes if isinstance(s, (list, tuple)) and len(s) == 2]
        if self.last is None or not mats or mats[0][1] != self.H:
            return "torch"
        rows, classes = self.last
        return "torch dW" if mats[0][0] == classes and classes != rows else "torch dx"


def _device_events(prof) -> List:
    return [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]


def _us(e) -> float:
    return float(e.time_range.end - e.time_range.start)


def split_kernels(records: List[Tuple[str, float, str, List]], H: int) -> Dict:
    """The split from (kernel name, microseconds, launching op, its input shapes) in launch order: ms per category
    (GEMM roles apart) and the kernels by total time."""
    roles = GemmRoles(H)
    cats: Dict[str, float] = {}
    kernels: Dict[str, List] = {}
    for name, us, op, shapes in records:
        cat = kernel_category(name)
        if cat == "gemm":
            cat = roles.role(op, shapes) if op in GEMM_OPS or op.startswith("aten::addmm") else "gemm (other)"
        elif cat == "torch":
            cat = roles.torch_role(shapes)
        cats[cat] = cats.get(cat, 0.0) + us / 1e3
        k = kernels.setdefault(name[:160], [cat, 0, 0.0])
        k[1] += 1
        k[2] += us / 1e3
    top = sorted(([n, c, calls, ms] for n, (c, calls, ms) in kernels.items()), key=lambda r: -r[3])
    return {**_totals(cats), "epilogue_ms": round(cats.get("epilogue", 0.0), 4),
            "kernel_ms": round(sum(cats.values()), 4),
            "kernels": [{"name": n, "category": c, "calls": calls, "ms": round(ms, 4)} for n, c, calls, ms in top[:25]]}


def _totals(cats: Dict[str, float]) -> Dict:
    """The split, and its sums: every GEMM, every torch kernel, and dW's GEMMs with its torch passes."""
    def total(*prefixes):
        return round(sum(v for k, v in cats.items() if k.startswith(prefixes)), 4)

    return {"ms": {k: round(v, 4) for k, v in sorted(cats.items())}, "gemm_ms": total("gemm"),
            "torch_ms": total("torch"), "dw_ms": total("gemm dW", "torch dW")}


def _records(prof) -> List[Tuple[str, float, str, List]]:
    """(kernel, us, op, shapes) of every device kernel in launch order; the op is the innermost aten op that lists
    the kernel, "" where none does (a Triton launch)."""
    owner: Dict[Tuple[str, float], List[Tuple[float, str, List]]] = {}
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            continue
        for k in getattr(e, "kernels", []) or []:
            owner.setdefault((k.name, float(k.duration)), []).append((e.time_range.start, e.name, e.input_shapes))
    out = []
    for e in sorted(_device_events(prof), key=lambda e: e.time_range.start):
        us = _us(e)
        cands = owner.get((e.name, us), [])
        # the op launched before the kernel started, latest first (an inner op after its outer one)
        before = [c for c in cands if c[0] <= e.time_range.start] or cands
        op, shapes = (before[-1][1], before[-1][2]) if before else ("", [])
        out.append((e.name, us, op, shapes))
    return out


def split_cpu(prof, H: int, wall_ms: float) -> Dict:
    """Without a GPU: the CPU ops' own time split the same way; "other" is the call's time no aten op holds."""
    roles = GemmRoles(H)
    cats: Dict[str, float] = {}
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        if not e.name.startswith("aten::") or str(getattr(e, "device_type", "")).endswith("CUDA"):
            continue
        ms = e.self_cpu_time_total / 1e3
        cat = roles.role(e.name, e.input_shapes) if e.name in GEMM_OPS or e.name.startswith("aten::addmm") \
            else roles.torch_role(e.input_shapes)
        if cat.startswith("gemm") and ms == 0:
            continue  # an outer op (matmul) whose time is its inner mm's
        cats[cat] = cats.get(cat, 0.0) + ms
    held = sum(cats.values())
    cats["other (kc C++ epilogue, Python)"] = max(0.0, wall_ms - held)
    return {**_totals(cats), "epilogue_ms": None, "kernel_ms": None, "kernels": []}


def profile_call(fn: Callable[[], object], device: torch.device, H: int) -> Dict:
    """One call of ``fn`` (already warmed up) under the profiler, split as the module docstring says; the
    profiler's own overhead makes ``wall_ms`` larger than a timed call."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=acts, record_shapes=True) as prof:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    out = split_kernels(_records(prof), H) if cuda else split_cpu(prof, H, wall_ms)
    out["wall_ms"] = round(wall_ms, 3)
    out["source"] = "device kernels (CUDA activities)" if cuda else "CPU op self time (no GPU)"
    return out
