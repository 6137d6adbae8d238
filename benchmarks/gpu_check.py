"""The GPU check of the soft-target op in one prepared run: the headline case, correctness, the benchmark table
(each kc row with one profiled call and the byte model's prediction beside it), host synchronisations and
determinism, written to one JSON file. ``bash benchmarks/gpu.sh`` drives it step by step (docs/gpu.md):

    python -m benchmarks.gpu_check STEP --work DIR [--dry-run] [--budget SECONDS] [--out PATH]
    STEP: headline | correctness | bench | syncs | determinism | report

Each step runs in its own process under its own time cap (a hung kernel costs one step, not the run) and rewrites
DIR/<step>.json after every case, so a step stopped at its cap still leaves what it did. ``--budget`` is the soft
cap: a step stops starting new cases past it. The correctness step runs its dtypes as parallel processes
(``--shard``): on a fresh machine its time goes to compiling kernel variants, which a process does one at a time.
``report`` merges the steps, the build record and the steps' exit codes into
benchmarks/results/gpu-<device>-<date>.json and prints a readable summary.

``--dry-run`` runs the same steps on the CPU at tiny shapes: the triton backend under TRITON_INTERPRET=1, the cpu
backend as a stand-in for a GPU one, the cuda backend recorded as unavailable, the peers recorded as GPU only beside
one that raises mid-case, profiles of the CPU ops, no sync counts.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

_T_START = time.monotonic()  # a step's soft cap counts its imports (torch takes seconds) too

if "--dry-run" in sys.argv:
    # the interpreter must be chosen before triton is imported; a GPU run compiles the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import kc_kernels  # noqa: E402
from benchmarks import common, gpu_model, gpu_profile  # noqa: E402
from benchmarks.common import LOSSES, Row  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests.helpers holds the problem builder and the tolerances the test suite uses
    sys.path.insert(0, str(ROOT))
from tests.helpers import TOLERANCES, make_problem, rel_err  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = ("headline", "correctness", "bench", "syncs", "determinism")  # in the order gpu.sh runs them
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLOAT_ARGS = ("x", "weight", "bias", "scale", "teacher_logits", "target_value", "sample_weight", "teacher_x",
              "teacher_weight", "teacher_bias")
GRAD_ARGS = ("x", "weight", "bias", "scale")


# ------------------------------------------------------------------------------------------------ settings

@dataclass(frozen=True)
class Case:
    """One correctness case: arguments of tests.helpers.make_problem (plus ``hard``: one label of value 1 per row)
    and of the op."""

    name: str
    problem: Dict
    op: Dict = field(default_factory=dict)
    dtypes: Tuple[str, ...] = ("bf16", "fp32", "fp16")


# Odd on purpose: V = 1237 is no multiple of any tile or chunk, make_problem pads K with -1 (and may repeat an
# index), memory_budget=1 forces the smallest chunk (256 classes), so segments span chunks or go through row blocks.
SMALL_CASES = [
    Case("sigmoid sparse K=7, 5 chunks", dict(B=37, H=40, V=1237, K=7), dict(mode="sigmoid", memory_budget=1)),
    Case("softmax hard label", dict(B=33, H=40, V=1237, hard=True), dict(mode="softmax")),
    Case("softmax dense G=3 class scale T=2 none", dict(B=19, H=40, V=611, G=3, target_form="dense",
                                                        scale_kind="class", sample_weight=True),
         dict(mode="softmax", temperature=2.0, reduction="none")),
    Case("sigmoid sparse G=6 class scale chunked", dict(B=29, H=40, V=1001, G=6, K=12, scale_kind="class"),
         dict(mode="sigmoid", memory_budget=1)),
    Case("softmax dense G=2 segment scale row blocks", dict(B=17, H=24, V=900, G=2, target_form="dense",
                                                            scale_kind="segment"),
         dict(mode="softmax", memory_budget=1)),
    Case("softmax sparse G=5 segment scale B=1 sum", dict(B=1, H=24, V=1237, G=5, K=5, scale_kind="segment"),
         dict(mode="softmax", reduction="sum")),
    Case("sigmoid dense G=4 segment scale T=1.5", dict(B=23, H=33, V=777, G=4, target_form="dense",
                                                       scale_kind="segment"), dict(mode="sigmoid", temperature=1.5)),
    Case("sigmoid grouped x G=3 segment scale", dict(B=13, H=24, V=300, G=3, K=6, grouped=True,
                                                     scale_kind="segment"), dict(mode="sigmoid")),
    Case("softmax sparse no bias G=4 none", dict(B=21, H=24, V=501, G=4, K=9, bias=False, sample_weight=True),
         dict(mode="softmax", reduction="none")),
    Case("softmax dense one-class segments", dict(B=9, H=16, V=6, G=6, target_form="dense", scale_kind="segment"),
         dict(mode="softmax")),
]
# the divergence modes, the teacher head and top-K teachers (docs/ops.md); "teacher_head": the head's width Ht
DISTILL_CASES = [
    Case("kl dense G=2 T=2", dict(B=21, H=32, V=777, G=2, target_form="dense"), dict(mode="kl", temperature=2.0)),
    Case("reverse_kl dense chunked", dict(B=19, H=32, V=1237, target_form="dense"),
         dict(mode="reverse_kl", memory_budget=1)),
    Case("jsd beta=0.3 teacher head T=2", dict(B=17, H=32, V=901, teacher_head=24),
         dict(mode="jsd", beta=0.3, temperature=2.0)),
    Case("jsd beta=0.6 sparse top-K G=3 row blocks", dict(B=13, H=24, V=600, G=3, K=5),
         dict(mode="jsd", beta=0.6, memory_budget=1)),
    Case("reverse_kl teacher head B=1", dict(B=1, H=16, V=1237, teacher_head=16), dict(mode="reverse_kl")),
]
BIG_CASE = Case("sigmoid sparse K=100 B=256 H=512 V=100000", dict(B=256, H=512, V=100_000, K=100),
                dict(mode="sigmoid"), dtypes=("bf16",))


@dataclass(frozen=True)
class Settings:
    device: str
    backends: Tuple[str, ...]  # the backends under check (correctness, determinism)
    timed_backends: Tuple[str, ...]  # the backends of the table and the sync counts
    cases: Tuple[Case, ...]  # correctness, in priority order (a time cap cuts the tail)
    # the table's cases (loss, B, H, V, rounds), in order; the first is the headline, run before everything else
    bench_cases: Tuple[Tuple[str, int, int, int, int], ...]
    bench_dtype: torch.dtype
    peers: Tuple[str, ...]  # peers of the hard-label CE rows (PEERS), each failing soft
    probe_shape: Tuple[int, int, int]  # (B, H, V) of the sync and determinism cases
    probe_segments: int  # verticals of the segmented one among them
    # dtype groups of the correctness step, one process each, run at once: Triton compiles every kernel variant on
    # the CPU, one at a time in a process, and compiling is most of that step's time on a fresh machine
    shards: Tuple[Tuple[str, ...], ...]
    num_sampled: int = 8192
    dry: bool = False


LLM = (8192, 4096, 128_256)
PAPER = (4096, 512, 100_000)
GPU = Settings(
    device="cuda", backends=("triton", "cuda"), timed_backends=("triton", "cuda"),
    cases=(BIG_CASE, *SMALL_CASES, *DISTILL_CASES),
    bench_cases=(("softmax-ce-hard", *LLM, 5),
                 ("sigmoid-k100", *PAPER, 7), ("softmax-kl-dense", *PAPER, 7), ("sampled-softmax", *PAPER, 7),
                 ("softmax-ce-hard", *PAPER, 7), ("kl-teacher-head", 4096, 2048, 128_256, 3),
                 ("jsd-teacher-head", 4096, 2048, 128_256, 3), ("sigmoid-k100", *LLM, 3),
                 ("softmax-kl-dense", *LLM, 3)),
    bench_dtype=torch.bfloat16, peers=("cce", "cce-exact", "liger-flce"),
    probe_shape=(512, 256, 20_011), probe_segments=16, shards=(("bf16",), ("fp32",), ("fp16",)))


def _tiny(case: Case, dtype: str, B: int = 4, V: int = 300) -> Case:
    """A case cut down for the interpreter, whose cost grows with B * V (V = 300 still spans two smallest chunks),
    in one dtype."""
    prob = dict(case.problem, B=min(case.problem["B"], B), V=min(case.problem["V"], V))
    return Case(case.name + " (tiny)", prob, case.op, (dtype,))


# the interpreter takes a good part of a second per kernel launch: a few cases, each in one dtype, and timings of
# the cpu backend only (the interpreter's are meaningless). The peers cannot run on CPU tensors (recorded as such),
# and "raising-peer" runs and then raises mid-case: the case's kc and floor rows must survive it.
DRY = Settings(
    device="cpu", backends=("cpu", "triton", "cuda"), timed_backends=("cpu", "cuda"),
    cases=(Case("sigmoid sparse K=20 (big case, tiny)", dict(B=6, H=32, V=700, K=20), dict(mode="sigmoid"),
                dtypes=("bf16",)),
           *(_tiny(SMALL_CASES[i], dt) for i, dt in ((0, "fp32"), (1, "fp16"), (2, "fp32"), (4, "bf16"), (7, "fp16"))),
           _tiny(DISTILL_CASES[2], "fp32")),
    bench_cases=(("softmax-ce-hard", 12, 16, 700, 2), ("sampled-softmax", 8, 16, 400, 1),
                 ("jsd-teacher-head", 8, 16, 400, 1),
                 ("sigmoid-k100", 8, 16, 400, 2), ("softmax-kl-dense", 8, 16, 400, 1)),
    bench_dtype=torch.bfloat16, peers=("cce", "cce-exact", "liger-flce", "raising-peer"),
    probe_shape=(4, 16, 500), probe_segments=3, shards=(("bf16", "fp16"), ("fp32",)), num_sampled=64, dry=True)


# ------------------------------------------------------------------------------------------------ plumbing

class Step:
    """One step's record, rewritten to DIR/<name>.json after every change so that a killed step leaves it."""

    def __init__(self, work: Path, name: str, budget: float):
        self.work = work
        self.path = work / f"{name}.json"
        self.deadline = _T_START + budget
        self.data: Dict = {"step": name, "budget_s": budget, "complete": False}
        self.save()

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_finite(self.data), indent=1, default=_json_default))
        tmp.replace(self.path)


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _finite(v):
    """JSON has no NaN: missing numbers are written as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _error(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}"


def _sync(device):
    common._sync(torch.device(device))


def backend_status(names, device: str = "cuda") -> Dict[str, Dict]:
    """{backend: {"available", "reason"}}; with CPU tensors (the dry run) the cuda backend cannot run even where
    a GPU is present."""
    status = kc_kernels.backends()
    out = {}
    for n in names:
        st = status.get(n, False)
        out[n] = {"available": bool(st), "reason": getattr(st, "reason", "")}
        if n == "cuda" and st and torch.device(device).type == "cpu":
            out[n] = {"available": False, "reason": "CPU tensors (dry run)"}
    return out


def _free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ correctness

def _build(case: Case, device) -> Dict:
    """The case's inputs in float64 on ``device`` (tests.helpers.make_problem), a hard label when asked."""
    kw = dict(case.problem)
    B, H, V = kw.pop("B"), kw.pop("H"), kw.pop("V")
    hard = kw.pop("hard", False)
    head = kw.pop("teacher_head", 0)
    gen = torch.Generator().manual_seed(7)
    prob = make_problem(B, H, V, gen=gen, device=device, **({"K": 1} if hard else {}), **kw)
    if head:  # a teacher head in place of the sparse targets
        del prob["target_index"], prob["target_value"]
        prob["teacher_x"] = torch.randn(B, head, generator=gen, dtype=torch.float64).to(device)
        prob["teacher_weight"] = (torch.randn(V, head, generator=gen, dtype=torch.float64) * 2 / head ** 0.5).to(device)
        prob["teacher_bias"] = (torch.randn(V, generator=gen, dtype=torch.float64) * 0.5).to(device)
    if hard:
        prob["target_index"] = torch.randint(0, V, (B, 1), generator=gen).to(device)
        prob["target_value"] = torch.ones(B, 1, dtype=torch.float64, device=device)
    return prob


def _cast(prob: Dict, dtype) -> Dict:
    """The float inputs in ``dtype``, the differentiable ones as fresh leaves."""
    out = {}
    for k, v in prob.items():
        if isinstance(v, torch.Tensor) and k in FLOAT_ARGS:
            v = v.detach().to(dtype)
            if k in GRAD_ARGS:
                v.requires_grad_()
        out[k] = v
    return out


def _loss(inputs: Dict, backend: str, op: Dict) -> torch.Tensor:
    a = dict(inputs)
    return kc_kernels.linear_soft_target_loss(a.pop("x"), a.pop("weight"), a.pop("bias"), backend=backend, **a, **op)


def _grads(loss: torch.Tensor, inputs: Dict) -> Dict[str, torch.Tensor]:
    names = [n for n in GRAD_ARGS if inputs.get(n) is not None]
    if loss.dim():  # reduction="none": weight the rows unevenly so that a row mix-up shows
        loss = (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)).sum()
    gs = torch.autograd.grad(loss, [inputs[n] for n in names], allow_unused=True)
    return dict(zip(names, gs))


def compare(actual: torch.Tensor, expected: torch.Tensor, dtype) -> Dict:
    """tests.helpers.assert_close's criterion (|a - e| <= atol * max(1, max|e|) + rtol |e|) as a record."""
    rtol, atol = TOLERANCES[dtype]
    if actual is None or expected is None:
        return {"ok": actual is None and expected is None, "note": "gradient missing on one side"}
    if actual.shape != expected.shape:
        return {"ok": False, "note": f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"}
    a, e = actual.detach().double(), expected.detach().double()
    tol = atol * max(1.0, e.abs().max().item() if e.numel() else 1.0)
    ok = bool(torch.allclose(a, e, rtol=rtol, atol=tol))
    max_abs = (a - e).abs().max().item() if a.numel() else 0.0
    return {"ok": ok, "max_abs_err": max_abs, "rel_err": rel_err(a, e), "rtol": rtol, "atol": tol}


def check_case(case: Case, backend: str, dtype_name: str, device) -> Dict:
    """The backend in ``dtype`` against the reference in float64 on the same (dtype-rounded) inputs: loss and
    the gradients of x, weight, bias and scale."""
    dtype = DTYPES[dtype_name]
    master = _build(case, device)
    low = _cast(master, dtype)
    high = _cast(_cast(master, dtype), torch.float64)
    checks = {}
    loss = _loss(low, backend, case.op)
    got = _grads(loss, low)
    ref = _loss(high, "reference", case.op)
    want = _grads(ref, high)
    checks["loss"] = compare(loss, ref, dtype)
    checks["loss"]["dtype_ok"] = loss.dtype == torch.float32
    for n, w in want.items():
        checks[f"d{n}"] = compare(got[n], w, dtype)
        if got[n] is not None and got[n].dtype != low[n].dtype:
            checks[f"d{n}"].update(ok=False, note=f"gradient dtype {got[n].dtype} != input dtype {low[n].dtype}")
    ok = all(c["ok"] for c in checks.values()) and checks["loss"]["dtype_ok"]
    return {"status": "pass" if ok else "fail", "checks": checks}


def run_correctness(s: Settings, step: Step, dtypes: Optional[Tuple[str, ...]] = None) -> None:
    """Every case in every dtype on every backend under check. Without ``dtypes``, the shards of ``s`` run as
    parallel processes and their records are merged here; with them (a shard), only those dtypes."""
    status = backend_status(s.backends, s.device)
    step.data.update(backends=status, cases=[])
    if dtypes is None and len(s.shards) > 1:
        run_shards(s, step)
        return
    live = [b for b in s.backends if status[b]["available"]]
    # dtype-major after the big case: a time cap then cuts the last dtype, not whole cases
    order = {d: i for i, d in enumerate(("bf16", "fp32", "fp16"))}
    jobs = sorted(((c, d) for c in s.cases for d in c.dtypes if dtypes is None or d in dtypes),
                  key=lambda j: (j[0] is not s.cases[0], order[j[1]]))
    for n, (case, dt) in enumerate(jobs):
        for b in live:
            rec = {"backend": b, "dtype": dt, "case": case.name}
            if (n or b != live[0]) and step.out_of_time():  # the first job runs whatever the soft cap
                rec["status"] = "skipped (time cap)"
            elif status[b].get("not_implemented"):
                rec["status"] = "unavailable"
                rec["error"] = status[b]["reason"]
            else:
                t0 = time.perf_counter()
                try:
                    rec.update(check_case(case, b, dt, s.device))
                except NotImplementedError as e:  # the op, or this case of it, is not there (yet)
                    rec.update(status="unavailable", error=_error(e))
                    if "does not implement" in str(e):  # the whole op (kc_kernels.dispatch): say so once
                        status[b].update(available=False, not_implemented=True, reason=_error(e))
                except Exception as e:
                    rec.update(status="error", error=_error(e), where=_where(e))
                rec["seconds"] = round(time.perf_counter() - t0, 3)
                _free(s.device)
            step.data["cases"].append(rec)
            step.save()
            print(f"  {rec['status']:<8} {b:<7} {dt:<5} {case.name}"
                  + (f"  ({rec['error']})" if "error" in rec else ""), flush=True)
    step.data["counts"] = case_counts(step.data["cases"])


def shard_name(dtypes) -> str:
    return "correctness." + "-".join(dtypes)


def run_shards(s: Settings, step: Step) -> None:
    """The shards as processes at once (same soft deadline), then their cases merged in shard order. Should this
    process be stopped first, the report merges the shards' records itself."""
    left = max(1.0, step.deadline - time.monotonic())
    procs = []
    for group in s.shards:
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "correctness", "--work", str(step.work),
               "--budget", f"{left:.0f}", "--shard", ",".join(group)] + (["--dry-run"] if s.dry else [])
        procs.append((group, subprocess.Popen(cmd, cwd=ROOT)))
    step.data["shards"] = []
    for group, proc in procs:
        rc = proc.wait()
        data = _read(step.work / f"{shard_name(group)}.json") or {}
        step.data["cases"] += data.get("cases", [])
        step.data["shards"].append({"dtypes": list(group), "rc": rc, "complete": bool(data.get("complete"))})
    step.data["counts"] = case_counts(step.data["cases"])


def case_counts(cases) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for r in cases:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def _where(e: BaseException) -> str:
    """The innermost frame of the project's code in the traceback (where a failure is to be looked at)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if str(ROOT) in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} ({f.name})"


# ------------------------------------------------------------------------------------------------ benchmark

def _cce_exact(p: common.Problem) -> Optional[Callable]:
    """Cut Cross-Entropy without its gradient filter: the release's cce_exact preset where it has one, else
    impl="cce" with filter_eps=None (the same computation in releases before the preset, e.g. PyPI's 25.1.1)."""
    if not p.x.is_cuda:
        return None
    try:
        import inspect

        import cut_cross_entropy.linear_cross_entropy as lce
    except ImportError:
        return None
    kw = dict(impl="cce_exact") if "cce_exact" in inspect.getsource(lce) else dict(impl="cce", filter_eps=None)

    def run():
        common.zero_grads(p.x, p.weight, p.bias)
        lce.linear_cross_entropy(p.x, p.weight, p.labels, **kw).backward()
        return (p.x.grad, p.weight.grad)

    return run


def _raising_peer(p: common.Problem) -> Callable:
    """The dry run's peer that imports and then fails: its warm-up, memory and first timed calls run (one logits
    GEMM), every later call raises. Its row keeps its one round; the case's other rows keep all of theirs."""
    calls = [0]

    def run():
        calls[0] += 1
        if calls[0] > 3:
            raise RuntimeError("raises from its second timed round on (a failing peer costs only its own row)")
        return p.x.detach() @ p.weight.detach().t()

    return run


# the peers of the hard-label CE rows: name -> f(problem) -> callable, or None where not installed / GPU only
PEERS: Dict[str, Callable[[common.Problem], Optional[Callable]]] = {
    "cce": lambda p: common.cce_fn(p, "cce") if p.x.is_cuda else None,
    "cce-exact": _cce_exact,
    "liger-flce": common.liger_fn,
    "raising-peer": _raising_peer,
}


def _impls(p: common.Problem, loss: str, s: Settings, live: List[str]) -> List[Tuple[str, Optional[Callable], str]]:
    """(name, callable or None, note) in the interleaving order of a round: the op on each backend, the floor, the
    peers. A peer whose setup raises anything is a row with the error as its note: Cut Cross-Entropy or
    Liger-Kernel may import and then fail on a torch or triton they were not written for, and that must cost their
    row only, never the case's kc and floor rows."""
    impls: List[Tuple[str, Optional[Callable], str]] = [(f"kc-{b}", common.kc_fn(p, b), "") for b in live]
    if loss.endswith("teacher-head"):  # the four GEMMs (the teacher's logits too); Liger-Kernel's chunked JSD
        from types import SimpleNamespace

        from benchmarks import distill

        h = SimpleNamespace(x=p.x, w=p.weight, tx=p.kwargs["teacher_x"], tw=p.kwargs["teacher_weight"],
                            labels=p.labels, clear=lambda: common.zero_grads(p.x, p.weight, p.bias))
        beta = 0.0 if loss.startswith("kl") else 0.5
        impls.append(("gemm-floor", distill.floor4_fn(h), "four GEMMs"))
        try:
            fn = distill.liger_fn(h, beta, p.kwargs["temperature"])
            impls.append(("liger-chunked-jsd", fn, "" if fn is not None else "not installed"))
        except Exception as e:
            impls.append(("liger-chunked-jsd", None, _error(e)))
        return impls
    impls.append(("gemm-floor", common.floor_fn(p), ""))
    if loss != "softmax-ce-hard":
        return impls
    for name in s.peers:
        try:
            fn = PEERS[name](p)
            note = "" if fn is not None else ("not installed" if p.x.is_cuda else "GPU only (CPU tensors)")
        except Exception as e:
            fn, note = None, _error(e)
        impls.append((name, fn, note))
    return impls


def _sampled_impls(p: common.Problem, S: int, live: List[str]) -> List[Tuple[str, Optional[Callable], str]]:
    """Sampled softmax with S fixed samples (no drawing in the timed call: the same candidates every round), dense
    gradients, against the three GEMMs at S classes."""
    B, V = p.x.shape[0], p.weight.shape[0]
    dev = p.x.device
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(5))[:S].to(dev)
    sampled = (ids, torch.full((B,), S / V, device=dev), torch.full((S,), S / V, device=dev))

    def op(backend):
        def run():
            common.zero_grads(p.x, p.weight, p.bias)
            kc_kernels.sampled_softmax_loss(p.x, p.weight, p.bias, p.labels, num_sampled=S, sampled=sampled,
                                            backend=backend).backward()
            return (p.x.grad, p.weight.grad, p.bias.grad)

        return run

    sub = common.Problem(p.x, p.weight[:S].detach(), p.bias[:S].detach())
    return [(f"kc-{b}", op(b), "") for b in live] + [("gemm-floor", common.floor_fn(sub), "floor at S classes")]


def _timed(fn: Callable, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def bench_case(loss: str, B: int, H: int, V: int, rounds: int, s: Settings, live: List[str], step: Step,
               whole: bool = False) -> Tuple[List[Row], List[Dict]]:
    """One case: a warm-up call and a peak-memory call per implementation, then interleaved timed rounds (the ratio
    is the median over rounds of op / floor of the same round: drift in clocks hits both alike), then one profiled
    call of kc on each backend and of the floor. Past the step's soft cap no new round starts, unless ``whole``
    (a step's first case: all its rounds). Returns the rows and the profiles."""
    device = torch.device(s.device)
    S = min(s.num_sampled, V // 2) if loss == "sampled-softmax" else 0
    shape = f"B={B} H={H} V={V}" + (f" S={S}" if S else "")
    p = common.make_problem("softmax-ce-hard" if S else loss, B, H, V, device, s.bench_dtype,
                            on_device=device.type == "cuda")
    rows, live_fns = {}, []
    for name, fn, note in (_sampled_impls(p, S, live) if S else _impls(p, loss, s, live)):
        row = rows[name] = Row(loss, shape, name, note=note)
        if fn is None:
            continue
        try:
            fn()  # compiles, autotunes
            row.peak_mb, out_mb = common.peak_memory(fn, device)
            row.extra_mb = row.peak_mb - out_mb
            live_fns.append((name, fn))
        except Exception as e:
            row.note = _error(e)
            _free(device)
    # a call that raises leaves the rounds (None in its round); the rounds it completed still count, and a ratio is
    # taken over the rounds where the op and the floor both ran: a peer that fails in round 3, even one that leaves
    # the device unusable, costs the later rounds, not the case
    times: Dict[str, List[Optional[float]]] = {n: [] for n, _ in live_fns}
    active = list(live_fns)
    done = 0
    for _ in range(rounds):
        if done and not whole and step.out_of_time():
            break
        for name, fn in list(active):
            try:
                times[name].append(_timed(fn, device))
            except Exception as e:
                rows[name].note = _error(e)
                times[name].append(None)
                active.remove((name, fn))
        done += 1
    floor = times.get("gemm-floor", [])
    for name, ts in times.items():
        row = rows[name]
        ok = [t for t in ts if t is not None]
        if not ok:
            continue
        row.ms, row.ms_min, row.rounds_ms = statistics.median(ok), min(ok), ok
        pairs = [(t, f) for t, f in zip(ts, floor) if t is not None and f is not None]
        if pairs:
            row.floor_ms = statistics.median(f for _, f in pairs)
            row.round_ratios = [t / f for t, f in pairs]
            row.round_ratio = statistics.median(row.round_ratios)
        row.note = (row.note + " " if row.note else "") + (f"{done} rounds" if len(ok) == done
                                                           else f"{len(ok)} of {done} rounds")
    profiles = []
    for name, fn in live_fns:
        if not (name.startswith("kc-") or name == "gemm-floor") or (name, fn) not in active:
            continue
        try:
            prof = gpu_profile.profile_call(fn, device, H)
        except Exception as e:
            prof = {"error": _error(e)}
        profiles.append({"case": loss, "shape": shape, "impl": name, "B": B, "H": H, "V": V, "S": S, "profile": prof})
    del p, live_fns
    _free(device)
    return list(rows.values()), profiles


def prediction_records(rows: List[Row], profiles: List[Dict], gpu_key: Optional[str]) -> List[Dict]:
    """Each profiled kc row against benchmarks/gpu_model.py's prediction for its case on this GPU (the H100's
    where the device is neither): epilogue, torch passes and GEMM milliseconds, and the ratio to the floor."""
    key = gpu_key or "H100"
    floor_prof = {(p["case"], p["shape"]): p["profile"] for p in profiles if p["impl"] == "gemm-floor"}
    by_impl = {(r.case, r.shape, r.impl): r for r in rows}
    out = []
    for p in profiles:
        if not p["impl"].startswith("kc-"):
            continue
        backend = p["impl"][3:]
        if backend not in gpu_model.FINAL_TILE:  # the cpu backend of the dry run: its epilogue has no GPU model
            backend = "triton"
        c = gpu_model.case_of(p["case"], p["B"], p["H"], p["V"], p["S"])
        pred = gpu_model.predict(c, backend, gpu_model.DATASHEET[key])
        at_measured = gpu_model.predict(c, backend, gpu_model.MEASURED[key])
        prof, fprof = p["profile"], floor_prof.get((p["case"], p["shape"]), {})
        row = by_impl.get((p["case"], p["shape"], p["impl"]))
        measured = {"epilogue_ms": prof.get("epilogue_ms"), "torch_ms": prof.get("torch_ms"),
                    "torch_dw_ms": (prof.get("ms") or {}).get("torch dW"), "dw_ms": prof.get("dw_ms"),
                    "gemm_ms": prof.get("gemm_ms"), "split_ms": prof.get("ms"),
                    "floor_gemm_ms": fprof.get("gemm_ms"), "kc_ms": None if row is None else _nan_none(row.ms),
                    "floor_ms": None if row is None else _nan_none(row.floor_ms),
                    "ratio": None if row is None else _nan_none(row.ratio)}
        predicted = {k: pred[k] for k in ("epilogue_ms", "epilogue_gb", "epilogue_bytes_per_logit", "torch_ms",
                                          "torch_gb", "gemm_ms", "floor_ms", "kc_ms", "ratio", "epilogue", "torch",
                                          "notes")}
        predicted["ratio_at_measured_rates"] = at_measured["ratio"]
        # dW's torch passes (its sum over row blocks), the part of the torch passes the profile tells apart
        predicted["torch_dw_ms"] = sum(v for k, v in pred["torch"].items() if k.startswith("dW")) * 1e12 \
            / gpu_model.DATASHEET[key].bandwidth
        out.append({"case": p["case"], "shape": p["shape"], "impl": p["impl"], "model": f"{key} {backend}",
                    "rates": pred["gpu"], "predicted": predicted, "measured": measured,
                    "epilogue_measured_over_predicted": _over(measured["epilogue_ms"], pred["epilogue_ms"]),
                    "torch_measured_over_predicted": _over(measured["torch_ms"], pred["torch_ms"]),
                    "ratio_measured_over_predicted": _over(measured["ratio"], pred["ratio"])})
    return out


def _nan_none(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _over(a, b):
    return None if a is None or not b else a / b


def run_bench(s: Settings, step: Step, cases=None) -> None:
    """The table's cases (``cases``: a slice of s.bench_cases) with their profiles and predictions; the first runs
    whatever the soft cap (the step's hard cap still bounds it), the others while time is left."""
    cases = s.bench_cases if cases is None else cases
    status = backend_status(s.timed_backends, s.device)
    live = [b for b in s.timed_backends if status[b]["available"]]
    gpu_key = gpu_model.gpu_of(device_name(s))
    step.data.update(backends=status, dtype=str(s.bench_dtype), rows=[], skipped=[], profiles=[], predictions=[],
                     peers={d: _dist_version(d) for d in ("cut-cross-entropy", "liger-kernel")},
                     model_gpu=gpu_key or "none (the H100 model is applied)")
    print(common.format_table([]), flush=True)
    for i, (loss, B, H, V, rounds) in enumerate(cases):
        if i and step.out_of_time():  # a step's first case always runs (the headline above all)
            step.data["skipped"].append(f"{loss} B={B} H={H} V={V} (time cap)")
            step.save()
            continue
        profiles: List[Dict] = []
        try:
            rows, profiles = bench_case(loss, B, H, V, rounds, s, live, step, whole=i == 0)
        except Exception as e:  # e.g. out of memory building the inputs
            rows = [Row(loss, f"B={B} H={H} V={V}", "-", note=_error(e))]
            _free(s.device)
        step.data["rows"] += [r.as_dict() for r in rows]
        step.data["profiles"] += profiles
        preds = prediction_records(rows, profiles, gpu_key)
        step.data["predictions"] += preds
        step.save()
        print("\n".join(common.format_table(rows).splitlines()[2:]), flush=True)
        for p in profiles:
            print("    " + _split_line(p), flush=True)
        for r in preds:
            print("    " + _prediction_line(r), flush=True)


def _split_line(p: Dict) -> str:
    prof = p["profile"]
    if "error" in prof:
        return f"profile {p['impl']}: {prof['error']}"
    parts = ", ".join(f"{k} {v:.2f}" for k, v in prof["ms"].items())
    total = f"kernels {prof['kernel_ms']:.2f}, " if prof.get("kernel_ms") is not None else ""
    return f"profile {p['impl']:<11} {parts} ms ({total}wall {prof['wall_ms']:.2f} ms)"


def _prediction_line(r: Dict) -> str:
    pr, me = r["predicted"], r["measured"]

    def f(v):
        return "-" if v is None else f"{v:.2f}"

    return (f"predicted {r['impl']:<9} ({r['model']}): epilogue {f(pr.get('epilogue_ms'))} ms, measured "
            f"{f(me.get('epilogue_ms'))}; torch passes {f(pr.get('torch_ms'))}, measured {f(me.get('torch_ms'))} "
            f"(of them dW {f(pr.get('torch_dw_ms'))}, measured {f(me.get('torch_dw_ms'))}); ratio "
            f"{f(pr.get('ratio'))}, measured {f(me.get('ratio'))}")


def _dist_version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


# ------------------------------------------------------------------------------------------------ syncs, determinism

def probe_cases(s: Settings) -> List[Tuple[str, str, Dict]]:
    """(name, benchmark loss, extra op arguments) of the sync and determinism checks: the table's three losses and
    the distillation layer's own case (verticals with a self-paced scale per class, several chunks)."""
    B, G = s.probe_shape[0], s.probe_segments
    return [(loss, loss, {}) for loss in LOSSES] + [
        (f"sigmoid-k100 G={G} class scale chunked", "sigmoid-k100", {"segments": G, "scale": "class",
                                                                     "memory_budget": B * 2 * 2048})]


def probe_problem(loss: str, extra: Dict, s: Settings) -> common.Problem:
    B, H, V = s.probe_shape
    device = torch.device(s.device)
    p = common.make_problem(loss, B, H, V, device, s.bench_dtype, seed=3, on_device=device.type == "cuda")
    kw = dict(extra)
    if "segments" in kw:
        G = kw.pop("segments")
        p.kwargs["segments"] = torch.linspace(0, V, G + 1).round().long().to(device)
        if kw.pop("scale") == "class":
            p.kwargs["scale"] = torch.full((V,), 2.0, dtype=s.bench_dtype, device=device).requires_grad_()
    p.kwargs.update(kw)
    return p


def step_fn(p: common.Problem, backend: str) -> Callable[[], Tuple[torch.Tensor, ...]]:
    """One training step of the op (fwd + bwd): the loss and every gradient, as fresh tensors."""
    leaves = [p.x, p.weight, p.bias] + ([p.kwargs["scale"]] if "scale" in p.kwargs else [])

    def run():
        common.zero_grads(*leaves)
        loss = kc_kernels.linear_soft_target_loss(p.x, p.weight, p.bias, backend=backend, **p.kwargs)
        loss.backward()
        return (loss.detach(),) + tuple(t.grad for t in leaves)

    return run


def count_syncs(fn: Callable) -> Dict:
    """Host synchronisations of one call of ``fn``: torch's sync debug mode warns at each ("called a synchronizing
    CUDA operation"), and those warnings are counted, all of them (the "always" filter: the default one shows a
    repeated warning once). Other warnings of the call (a compiler's, say) are listed apart."""
    where: List[str] = []
    other: List[str] = []

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            other.append(f"{category.__name__}: {str(message)[:200]}")
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "kc_kernels" in f.filename]
        f = frames[-1] if frames else None
        where.append(f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} ({f.name})" if f
                     else f"{os.path.basename(filename)}:{lineno}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return {"count": len(where), "where": sorted(set(where)), "other_warnings": sorted(set(other))[:10]}


def run_syncs(s: Settings, step: Step) -> None:
    status = backend_status(s.timed_backends, s.device)
    live = [b for b in s.timed_backends if status[b]["available"]]
    step.data.update(backends=status, env={"KC_CHECK_VALUES": os.environ.get("KC_CHECK_VALUES")}, results=[])
    counting = torch.device(s.device).type == "cuda"
    if counting:
        # the counter itself must see a known synchronisation, or zero counts below would mean nothing
        step.data["probe_item"] = count_syncs(lambda: torch.ones(2, device=s.device).sum().item())["count"]
    else:
        step.data["note"] = "no CUDA device: torch's sync debug mode needs one; the steps only run"
    for n, (name, loss, extra) in enumerate(probe_cases(s)):
        for b in live:
            rec = {"backend": b, "case": name}
            if (n or b != live[0]) and step.out_of_time():  # the first runs whatever the soft cap
                rec["status"] = "skipped (time cap)"
            else:
                t0 = time.perf_counter()
                try:
                    p = probe_problem(loss, extra, s)
                    fn = step_fn(p, b)
                    if counting:
                        rec["first_call"] = count_syncs(fn)  # one-time work (segment layout, plan tables)
                        fn()
                        rec["steady"] = count_syncs(fn)
                        rec["status"] = "ok"
                    else:
                        fn()
                        rec["status"] = "not counted"
                    del p, fn
                except Exception as e:
                    rec.update(status="error", error=_error(e), where=_where(e))
                rec["seconds"] = round(time.perf_counter() - t0, 3)
                _free(s.device)
            step.data["results"].append(rec)
            step.save()
            n = rec.get("steady", {}).get("count", "-")
            print(f"  {rec['status']:<10} {b:<7} {name}: steady-state syncs {n}", flush=True)


def run_determinism(s: Settings, step: Step) -> None:
    status = backend_status(s.backends, s.device)
    live = [b for b in s.backends if status[b]["available"]]
    step.data.update(backends=status, results=[])
    for n, (name, loss, extra) in enumerate(probe_cases(s)):
        for b in live:
            rec = {"backend": b, "case": name}
            if (n or b != live[0]) and step.out_of_time():  # the first runs whatever the soft cap
                rec["status"] = "skipped (time cap)"
            else:
                t0 = time.perf_counter()
                try:
                    p = probe_problem(loss, extra, s)
                    fn = step_fn(p, b)
                    first = [None if t is None else t.clone() for t in fn()]
                    second = fn()
                    names = ["loss", "dx", "dweight", "dbias", "dscale"][:len(first)]
                    same = {n: (a is None and c is None) or (a is not None and c is not None and torch.equal(a, c))
                            for n, a, c in zip(names, first, second)}
                    rec.update(status="pass" if all(same.values()) else "fail", bitwise_equal=same)
                    del p, fn, first, second
                except Exception as e:
                    rec.update(status="error", error=_error(e), where=_where(e))
                rec["seconds"] = round(time.perf_counter() - t0, 3)
                _free(s.device)
            step.data["results"].append(rec)
            step.save()
            print(f"  {rec['status']:<8} {b:<7} {name}" + (f"  ({rec['error']})" if "error" in rec else ""),
                  flush=True)


# ------------------------------------------------------------------------------------------------ report

def device_name(s: Settings) -> str:
    if torch.device(s.device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    from benchmarks.__main__ import device_name as host_name

    return host_name(torch.device("cpu"))


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _steps_status(work: Path) -> Dict[str, Dict]:
    """Exit code and seconds of each step as gpu.sh recorded them (rc 124/137: stopped at the hard cap)."""
    out = {}
    for line in (work / "steps.tsv").read_text().splitlines() if (work / "steps.tsv").exists() else []:
        name, rc, secs, cap = line.split("\t")
        out[name] = {"rc": int(rc), "seconds": int(secs), "cap_s": int(cap), "timed_out": rc in ("124", "137")}
    return out


def _log_tail(work: Path, name: str, lines: int = 40) -> str:
    p = work / f"{name}.log"
    return "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) if p.exists() else ""


def _merge_shards(work: Path, data: Dict) -> Dict:
    """The correctness record from its shards' files, when the step was stopped before it merged them."""
    shards = sorted(work.glob("correctness.*.json"))
    data = dict(data, cases=[c for p in shards for c in (_read(p) or {}).get("cases", [])])
    data["counts"] = case_counts(data["cases"])
    return data


def verdict(name: str, data: Optional[Dict], proc: Dict) -> str:
    """pass / fail / incomplete / crashed for one step."""
    if data is None:
        return "not run" if not proc else "crashed"
    if proc.get("timed_out"):
        return "incomplete (hard cap)"
    if proc.get("rc", 0) != 0:
        return "crashed"
    if name == "correctness":
        c = data.get("counts", {})
        bad = c.get("fail", 0) + c.get("error", 0)
        return "fail" if bad else ("pass" if c.get("pass") else "nothing ran")
    if name == "determinism":
        st = [r["status"] for r in data.get("results", [])]
        return "fail" if any(x in ("fail", "error") for x in st) else ("pass" if "pass" in st else "nothing ran")
    if name == "syncs":
        st = [r["status"] for r in data.get("results", [])]
        return "error" if "error" in st else "done"
    if name in ("headline", "bench"):
        return "done" if any(r.get("median_ms") is not None for r in data.get("rows", [])) else "nothing timed"
    return "done"


def run_report(s: Settings, work: Path, out: Optional[str], dry: bool) -> Path:
    procs = _steps_status(work)
    meta = {"device": device_name(s), "dry_run": dry, "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "triton": _dist_version("triton"), "backends": backend_status(("reference", "cpu", "triton", "cuda")),
            "built_libraries": kc_kernels.built_libraries(),
            "KC_CHECK_VALUES": os.environ.get("KC_CHECK_VALUES"),
            "peers": {d: _dist_version(d) for d in ("cut-cross-entropy", "liger-kernel")}}
    report = {"meta": meta, "build": _read(work / "build.json") or {"status": "not run"}, "steps": {}}
    if report["build"].get("status") == "failed":
        # a compiler's first errors say more than the tail, where pip repeats that a command failed
        log = (work / "build.log").read_text(errors="replace").splitlines() if (work / "build.log").exists() else []
        report["build"]["errors"] = [line for line in log if "error" in line.lower()][:30]
        report["build"]["log_tail"] = _log_tail(work, "build", 60)
    for name in STEPS:
        data, proc = _read(work / f"{name}.json"), procs.get(name, {})
        if name == "correctness" and data is not None and "counts" not in data:
            data = _merge_shards(work, data)
        v = verdict(name, data, proc)
        entry = {"verdict": v, "process": proc, "result": data}
        if v.startswith(("crashed", "incomplete")):
            entry["log_tail"] = _log_tail(work, name)
        report["steps"][name] = entry
    # the table's two steps merged: every row, every profile, every measured-against-predicted record
    table = [(report["steps"][n]["result"] or {}) for n in ("headline", "bench")]
    report["table"] = {k: [x for t in table for x in t.get(k, [])] for k in ("rows", "profiles", "predictions")}
    gpu_key = gpu_model.gpu_of(meta["device"]) if not dry else None
    report["model"] = {"gpu": gpu_key or "none: both GPUs' predictions", "doc": "docs/performance.md",
                       "predictions": gpu_model.predictions(gpu_key)}
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]).strip("-").lower()
    if out:
        path = Path(out)
    elif dry:
        path = work / f"gpu-dry-run-{slug}.json"
    else:
        path = RESULTS / f"gpu-{slug}-{_dt.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(report), indent=1, default=_json_default))
    try:
        print_summary(report)
    except Exception:  # the JSON is written; a summary that trips on an odd record must not hide that
        traceback.print_exc()
    print(f"\nwrote {path}")
    return path


def print_summary(report: Dict) -> None:
    m = report["meta"]
    print(f"\n== {m['device']}  torch {m['torch']}  triton {m['triton']}  cuda {m['cuda']}"
          + ("  (dry run)" if m["dry_run"] else ""))
    print("backends: " + ", ".join(f"{k}={'yes' if v['available'] else 'no'}" for k, v in m["backends"].items()))
    b = report["build"]
    print(f"build: {b.get('status')}" + (f" ({b['seconds']} s)" if "seconds" in b else ""))
    for name, e in report["steps"].items():
        proc = e["process"]
        print(f"{name:<12} {e['verdict']:<22} {proc.get('seconds', '-')} s of cap {proc.get('cap_s', '-')} s")
    corr = (report["steps"]["correctness"]["result"] or {}).get("cases", [])
    counts: Dict[str, int] = {}
    for c in corr:
        key = f"{c['backend']} {c['status']}"
        counts[key] = counts.get(key, 0) + 1
    if counts:
        print("\ncorrectness: " + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())))
    bad = [c for c in corr if c["status"] in ("fail", "error")]
    if bad:
        print("not passed:")
        for c in bad:
            worst = {k: v.get("rel_err") for k, v in c.get("checks", {}).items() if not v.get("ok")}
            print(f"  {c['status']:<6} {c['backend']:<7} {c['dtype']:<5} {c['case']}  {c.get('error', '')}",
                  worst or "")
    rows = report["table"]["rows"]
    if rows:
        table = [Row(r["case"], r["shape"], r["impl"], *(_nan(r[k]) for k in
                                                          ("median_ms", "min_ms", "peak_mb", "extra_mb", "floor_ms")),
                     note=r["note"], round_ratio=_nan(r["ratio"]) if r["impl"] != "gemm-floor" else math.nan)
                 for r in rows]
        print("\n" + common.format_table(table))
    if report["table"]["profiles"]:
        print("\nwhere the time goes (one profiled call each):")
        for p in report["table"]["profiles"]:
            print(f"  {p['case']:<16} {p['shape']:<27} " + _split_line(p))
    if report["table"]["predictions"]:
        print("\nmeasured against docs/performance.md's prediction:")
        for r in report["table"]["predictions"]:
            print(f"  {r['case']:<16} {r['shape']:<27} " + _prediction_line(r))
    for name in ("syncs", "determinism"):
        res = (report["steps"][name]["result"] or {}).get("results", [])
        if res:
            print(f"\n{name}:")
        for r in res:
            detail = ""
            if name == "syncs" and "steady" in r:
                detail = (f"first call {r['first_call']['count']}, steady {r['steady']['count']} "
                          f"{r['steady']['where'] or ''}")
            elif name == "determinism" and "bitwise_equal" in r:
                detail = " ".join(k for k, v in r["bitwise_equal"].items() if not v) or "bitwise equal"
            print(f"  {r['status']:<18} {r['backend']:<7} {r['case']:<40} {detail} {r.get('error', '')}")


def _nan(v):
    return math.nan if v is None else v


# ------------------------------------------------------------------------------------------------ main

RUNNERS = {"headline": lambda s, step: run_bench(s, step, s.bench_cases[:1]), "correctness": run_correctness,
           "bench": lambda s, step: run_bench(s, step, s.bench_cases[1:]), "syncs": run_syncs,
           "determinism": run_determinism}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=(*STEPS, "report"))
    ap.add_argument("--work", required=True, help="folder of the steps' records")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (see the module docstring)")
    ap.add_argument("--budget", type=float, default=60.0, help="soft time cap of the step in seconds")
    ap.add_argument("--out", default=None,
                    help="results JSON of the report (default benchmarks/results/gpu-<device>-<date>.json)")
    ap.add_argument("--shard", default=None, help="correctness: these dtypes only (comma separated), one shard")
    args = ap.parse_args(argv)
    s = DRY if args.dry_run else GPU
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.step == "report":
        run_report(s, work, args.out, args.dry_run)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run on a machine without one", file=sys.stderr)
        return 2
    if args.shard:
        dtypes = tuple(args.shard.split(","))
        step = Step(work, shard_name(dtypes), args.budget)
        run_correctness(s, step, dtypes)
    else:
        step = Step(work, args.step, args.budget)
        print(f"== {args.step} (soft cap {args.budget:.0f} s)", flush=True)
        RUNNERS[args.step](s, step)
    step.data["complete"] = True
    step.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
