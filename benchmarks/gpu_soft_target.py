"""GPU benchmark of the fused linear + soft-target loss (triton backend) against its GEMM floor and other fused losses.

    python benchmarks/gpu_soft_target.py [--quick] [--out benchmarks/results/gpu_soft_target_<gpu>.json]

Times forward + backward (dx and dW, plus dbias/dscale where present) and reports the peak memory above the
inputs. The floor is the three cuBLAS GEMMs the op cannot avoid: x W^T, G W and G^T x. For hard-label softmax,
Liger-Kernel's fused linear cross-entropy and Cut Cross-Entropy are timed too when they can be imported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kc_kernels  # noqa: E402

SHAPES = [(8192, 4096, 100_000), (4096, 512, 100_000)]
QUICK_SHAPES = [(1024, 512, 20_000)]


def _time_ms(fn: Callable[[], None], warmup: int = 2, iters: int = 5):
    """Median wall time of fn in ms, and its peak memory in MB above what was allocated before the first call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    times.sort()
    return times[len(times) // 2], peak


def _inputs(B, H, V, dtype, K, G, gen):
    x = torch.randn(B, H, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    w = (torch.randn(V, H, device="cuda", dtype=dtype, generator=gen) / H ** 0.5).requires_grad_()
    bias = torch.zeros(V, device="cuda", dtype=dtype).requires_grad_()
    idx = torch.randint(0, V, (B, K), device="cuda", generator=gen)
    val = torch.rand(B, K, device="cuda", generator=gen)
    seg = None
    scale = None
    if G > 1:
        seg = torch.linspace(0, V, G + 1, device="cuda").round().long()
        scale = (torch.diff(seg).float().sqrt()).requires_grad_()
    return x, w, bias, idx, val, seg, scale


def _fused_case(B, H, V, dtype, gen, *, mode, K, G, use_scale):
    x, w, bias, idx, val, seg, scale = _inputs(B, H, V, dtype, K, G, gen)
    if K == 1:
        val = torch.ones_like(val)
    params = [x, w, bias] + ([scale] if use_scale else [])

    def step():
        loss = kc_kernels.linear_soft_target_loss(x, w, bias, target_index=idx, target_value=val, mode=mode,
                                                  segments=seg, scale=scale if use_scale else None, backend="triton")
        torch.autograd.grad(loss, params)

    return step


def _gemm_floor(B, H, V, dtype, gen):
    x = torch.randn(B, H, device="cuda", dtype=dtype, generator=gen)
    w = torch.randn(V, H, device="cuda", dtype=dtype, generator=gen)
    g = torch.randn(B, V, device="cuda", dtype=dtype, generator=gen)

    def step():
        x @ w.t()
        g @ w
        g.t() @ x

    return step


def _liger(B, H, V, dtype, gen):
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as fn
    except ImportError:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            return None
        module = LigerFusedLinearCrossEntropyLoss()

        def fn(inp, weight, target):
            return module(weight, inp, target)
    x, w, *_ = _inputs(B, H, V, dtype, 1, 1, gen)
    labels = torch.randint(0, V, (B,), device="cuda", generator=gen)

    def step():
        out = fn(x, w, labels)
        loss = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(loss, [x, w])

    return step


def _cce(B, H, V, dtype, gen):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    x, w, *_ = _inputs(B, H, V, dtype, 1, 1, gen)
    labels = torch.randint(0, V, (B,), device="cuda", generator=gen)

    def step():
        torch.autograd.grad(linear_cross_entropy(x, w, labels), [x, w])

    return step


def run(shapes, dtype) -> List[Dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for B, H, V in shapes:
        floor_ms, floor_mb = _time_ms(_gemm_floor(B, H, V, dtype, gen))
        rows.append(dict(B=B, H=H, V=V, backend="cuBLAS 3 GEMMs", case="floor", ms=floor_ms, peak_mb=floor_mb))
        torch.cuda.empty_cache()
        cases = [("sigmoid K=100", dict(mode="sigmoid", K=100, G=1, use_scale=False)),
                 ("sigmoid K=100 G=16 +scale", dict(mode="sigmoid", K=100, G=16, use_scale=True)),
                 ("softmax hard label", dict(mode="softmax", K=1, G=1, use_scale=False))]
        for name, kw in cases:  # inputs are made per case so that only one set is alive at a time
            row = _measure(B, H, V, "kc triton", name, _fused_case(B, H, V, dtype, gen, **kw), floor_ms)
            row.update(_tuned_configs())
            rows.append(row)
        for backend, make in (("liger FLCE", _liger), ("cut cross-entropy", _cce)):
            step = None
            try:
                step = make(B, H, V, dtype, gen)
            except Exception as e:  # a third-party version mismatch must not stop the benchmark
                rows.append(dict(B=B, H=H, V=V, backend=backend, case="softmax hard label", error=repr(e)))
            if step is not None:
                rows.append(_measure(B, H, V, backend, "softmax hard label", step, floor_ms))
    return rows


def _tuned_configs() -> Dict:
    """The autotuner's choices for the last call (for tuning the candidate lists later)."""
    from kc_kernels.triton import _soft_target_bwd, _soft_target_fwd

    out = {}
    for name, kernel in (("fwd_config", _soft_target_fwd._soft_target_fwd_kernel),
                         ("bwd_config", _soft_target_bwd._soft_target_bwd_kernel)):
        best = getattr(kernel, "best_config", None)
        if best is not None:
            out[name] = str(best)
    return out


def _measure(B, H, V, backend, case, step, floor_ms) -> Dict:
    row = dict(B=B, H=H, V=V, backend=backend, case=case)
    try:
        ms, mb = _time_ms(step)
        row.update(ms=ms, peak_mb=mb, ratio_to_floor=ms / floor_ms)
    except Exception as e:
        row["error"] = repr(e)
    torch.cuda.empty_cache()
    return row


def _print(rows: List[Dict]):
    print(f"{'B':>6} {'H':>5} {'V':>7}  {'backend':<18} {'case':<26} {'ms':>9} {'peak MB':>9} {'x floor':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['B']:>6} {r['H']:>5} {r['V']:>7}  {r['backend']:<18} {r['case']:<26}  error: {r['error']}")
            continue
        ratio = f"{r['ratio_to_floor']:.2f}" if "ratio_to_floor" in r else "1.00"
        print(f"{r['B']:>6} {r['H']:>5} {r['V']:>7}  {r['backend']:<18} {r['case']:<26} {r['ms']:>9.2f} "
              f"{r['peak_mb']:>9.0f} {ratio:>8}")


def main(argv: Optional[List[str]] = None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small shape (a smoke run)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_soft_target_<gpu>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    rows = run(QUICK_SHAPES if args.quick else SHAPES, dtype)
    _print(rows)
    gpu = torch.cuda.get_device_name()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"gpu_soft_target_{gpu.replace(' ', '_')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    import triton

    meta = dict(gpu=gpu, dtype=args.dtype, torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
