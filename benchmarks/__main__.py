"""kc's benchmark table: `python -m benchmarks [--device cpu|cuda] [--shapes small,paper] [--rounds 7] [...]`.

Times forward + backward of linear_soft_target_loss on every available backend and of the peers (PyTorch eager,
torch.compile, Cut Cross-Entropy, Liger-Kernel; each where installed and where it supports the loss), sampled
softmax, and one student training step, each case against its GEMM floor. The floor and every implementation of a
case are timed in interleaved rounds (each once per round, the order rotated), and a row's ratio is the median of
its per-round ratios to the floor of the same round, so that the machine's drift cancels. Prints a table and writes
benchmarks/results/<device>-<date>.json with every round.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import List, Tuple

import torch

import kc_kernels
from benchmarks import common
from benchmarks.common import LOSSES, SHAPES, Row

RESULTS = Path(__file__).resolve().parent / "results"  # where results are kept in the repository (committed by hand)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
PARTS = ("soft-target", "sampled", "student", "distill")
PEERS = ("eager", "compile", "cce", "liger")


def default_out_dir() -> Path:
    """Outside the source tree: $KC_BENCH_DIR, else $XDG_CACHE_HOME/kc/benchmarks, else ~/.cache/kc/benchmarks."""
    env = os.environ.get("KC_BENCH_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "kc" / "benchmarks"


def _fail(option: str, msg: str) -> "SystemExit":
    return SystemExit(f"python -m benchmarks: {option}: {msg}")


def _check_args(args) -> Tuple[torch.device, torch.dtype]:
    """One-line errors (exit status 1 with the message, no traceback) for options that cannot run here."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise _fail("--device", f"unknown device {args.device!r} (use cpu or cuda)") from None
    if device.type not in ("cpu", "cuda"):
        raise _fail("--device", f"{args.device!r}: the benchmarks run on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _fail("--device", "cuda was asked for but this machine has no usable CUDA device (use --device cpu)")
    if args.dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif args.dtype.lower() in DTYPES:
        dtype = DTYPES[args.dtype.lower()]
    else:
        raise _fail("--dtype", f"unknown dtype {args.dtype!r} (use one of {', '.join(DTYPES)})")
    for option, given, known in (("--parts", args.parts, PARTS), ("--peers", args.peers, PEERS)):
        unknown = [v for v in given.split(",") if v.strip() and v.strip() not in known]
        if unknown:
            raise _fail(option, f"unknown {', '.join(map(repr, unknown))} (use {', '.join(known)})")
    unknown = [v for v in args.losses.split(",") if v not in LOSSES]
    if unknown:
        raise _fail("--losses", f"unknown {', '.join(map(repr, unknown))} (use {', '.join(LOSSES)})")
    if args.rounds < 1:
        raise _fail("--rounds", f"must be at least 1, got {args.rounds}")
    try:
        [int(m) for m in args.memory_budgets.split(",") if m.strip()]
    except ValueError:
        raise _fail("--memory-budgets", f"expected MiB as integers, comma separated, got {args.memory_budgets!r}") \
            from None
    return device, dtype


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model} ({os.cpu_count()} cores)"


def parse_shapes(spec: str, device: torch.device) -> List[Tuple[int, int, int]]:
    out = []
    for part in spec.split(","):
        part = part.strip()
        if part in SHAPES:
            if part == "llm" and device.type != "cuda":
                continue
            out.extend(SHAPES[part])
        elif re.fullmatch(r"\d+x\d+x\d+", part):
            out.append(tuple(int(v) for v in part.split("x")))
        else:
            raise SystemExit(f"--shapes: unknown shape {part!r} (use {', '.join(SHAPES)} or BxHxV)")
    return out


def kc_backends(device: torch.device) -> List[str]:
    status = kc_kernels.backends()
    names = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpu", "reference")
    return [n for n in names if status[n]]


def _print_rows(rows: List[Row]) -> None:
    print("\n".join(common.format_table(rows).splitlines()[2:]), flush=True)


def run_soft_target(args, device, dtype, rows) -> None:
    for B, H, V in parse_shapes(args.shapes, device):
        shape = f"B={B} H={H} V={V}"
        for loss in args.losses.split(","):
            p = common.make_problem(loss, B, H, V, device, dtype)
            impls = [(f"kc-{b}", common.kc_fn(p, b)) for b in kc_backends(device)
                     if not (b == "reference" and B * V > args.reference_max_elements)]
            for mib in [int(m) for m in args.memory_budgets.split(",") if m.strip()]:
                impls += [(f"kc-{b}-{mib}MiB", common.kc_fn(p, b, memory_budget=mib << 20))
                          for b in kc_backends(device) if b != "reference"]
            if "eager" in args.peers:
                impls.append(("torch-eager", common.eager_fn(p)))
            if "compile" in args.peers:
                impls.append(("torch-compile", common.eager_fn(p, compiled=True)))
            if loss == "softmax-ce-hard":
                if "cce" in args.peers:
                    impls.append(("cut-cross-entropy", common.cce_fn(p)))
                if "liger" in args.peers:
                    impls.append(("liger-flce", common.liger_fn(p)))
            warm = {name: 2 for name in ("torch-compile", "cut-cross-entropy", "liger-flce")}
            case_rows = common.measure_interleaved(loss, shape, common.floor_fn(p), impls, device, args.rounds, warm,
                                                   clear=lambda p=p: common.zero_grads(p.x, p.weight, p.bias))
            rows.extend(case_rows)
            _print_rows(case_rows)
            del p


def run_sampled(args, device, dtype, rows) -> None:
    """Sampled softmax (drawing the candidates included) against the three GEMMs at the sampled width."""
    for B, H, V in parse_shapes(args.shapes, device):
        S = min(args.num_sampled, V // 2)
        shape = f"B={B} H={H} V={V} S={S}"
        p = common.make_problem("softmax-ce-hard", B, H, V, device, dtype)
        sub = common.Problem(p.x, p.weight[:S].detach(), p.bias[:S].detach())
        gen = torch.Generator().manual_seed(0)
        status = kc_kernels.backends()
        names = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
        impls = []
        for backend in [n for n in names if status[n]]:
            for sparse in (False, True):
                def fn(backend=backend, sparse=sparse):
                    common.zero_grads(p.x, p.weight, p.bias)
                    kc_kernels.sampled_softmax_loss(p.x, p.weight, p.bias, p.labels, num_sampled=S, generator=gen,
                                                    backend=backend, sparse_grad=sparse).backward()
                    return (p.x.grad, p.weight.grad, p.bias.grad)

                impls.append((f"kc-{backend}" + ("-sparse" if sparse else ""), fn))
        case_rows = common.measure_interleaved("sampled-softmax", shape, common.floor_fn(sub), impls, device,
                                               args.rounds, floor_name="gemm-floor(S)",
                                               clear=lambda: common.zero_grads(p.x, p.weight, p.bias))
        rows.extend(case_rows)
        _print_rows(case_rows)


def run_student(args, device, dtype, rows) -> None:
    """One optimiser step of a student (MLP backbone, FC-SC head, fused loss) at the paper's head shape, against
    the GEMMs of the same step (backbone forward and backward, the head's three)."""
    try:
        from benchmarks.student_step import make_student_step
    except ImportError as e:  # the training layer is optional for the kernel benchmarks
        rows.append(Row("student-step", "-", "kc", note=f"skipped: {e}"))
        return
    for B, H, V in parse_shapes(args.shapes, device):
        shape = f"B={B} H={H} V={V}"
        step, floor = make_student_step(B, H, V, device, dtype)
        case_rows = common.measure_interleaved("student-step", shape, floor, [("kc", step)], device, args.rounds)
        rows.extend(case_rows)
        _print_rows(case_rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default: cuda where a CUDA device is usable)")
    ap.add_argument("--dtype", default=None,
                    help="float32/fp32 (CPU default), bfloat16/bf16 (CUDA default) or float16/fp16")
    ap.add_argument("--shapes", default="small,paper", help="names (small, paper, llm) or BxHxV, comma separated")
    ap.add_argument("--losses", default=",".join(LOSSES), help="the soft-target cases, comma separated")
    ap.add_argument("--peers", default="eager,cce,liger", help="eager, compile, cce, liger (comma separated)")
    ap.add_argument("--parts", default="soft-target,sampled,student",
                    help="soft-target, sampled, student, distill (teacher head and CE options; comma separated)")
    ap.add_argument("--num-sampled", type=int, default=8192,
                    help="candidates drawn per call in the sampled-softmax part (at most V/2)")
    ap.add_argument("--distill-shape", default="1024,512,100000,512",
                    help="B,H,V,Ht of the distill part (Ht: the teacher head's width)")
    ap.add_argument("--memory-budgets", default="",
                    help="extra kc rows at these memory budgets (MiB, comma separated), e.g. 32,128,512")
    ap.add_argument("--rounds", type=int, default=7,
                    help="interleaved timing rounds per case (every implementation and the floor once a round)")
    ap.add_argument("--reference-max-elements", type=float, default=2.0e9,
                    help="skip the reference backend above this many B*V logits (it materialises them)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default: <device>-<date>.json in $KC_BENCH_DIR, else ~/.cache/kc/benchmarks)")
    args = ap.parse_args(argv)
    device, dtype = _check_args(args)
    print(f"device: {device_name(device)}; dtype {dtype}; torch {torch.__version__}; backends {kc_kernels.backends()}")
    print("\n".join(common.format_table([]).splitlines()[:2]))
    rows = []
    parts = args.parts.split(",")
    if "soft-target" in parts:
        run_soft_target(args, device, dtype, rows)
    if "sampled" in parts:
        run_sampled(args, device, dtype, rows)
    if "student" in parts:
        run_student(args, device, dtype, rows)
    if "distill" in parts:
        from benchmarks.distill import run_distill

        run_distill(args, device, dtype, rows, kc_backends(device))
    print("\n" + common.format_table(rows))
    tag = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()
    out = Path(args.out) if args.out else default_out_dir() / f"{tag}-{_dt.date.today().isoformat()}.json"
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name(device), "device_type": device.type, "dtype": str(dtype),
            "torch": torch.__version__, "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "python": sys.version.split()[0], "threads": torch.get_num_threads(), "argv": argv or sys.argv[1:],
            "rounds": args.rounds, "ratio": "median over rounds of op / floor timed in the same round",
            "load_avg_end": os.getloadavg()}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    out.write_text(json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows]}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
