"""Compile every variant of the soft-target kernels for a CUDA target without a GPU (ptxas included).

The interpreter accepts programs the compiler rejects (and the other way round), so this is the check for machines
without a GPU: ``python tests/compile_soft_target_kernels.py [--arch 90] [--dtypes bf16 fp16 fp32] [--all-configs]``.
It must run without TRITON_INTERPRET=1 (the kernels are compiled, not interpreted). Prints registers and spills.
"""
import argparse
import itertools
import os
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this compiles the kernels")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kc_kernels.triton import _soft_target_bwd, _soft_target_fwd  # noqa: E402

INPUT_PTRS = ("x_ptr", "w_ptr", "bias_ptr", "logits_ptr", "dlogits_ptr")
FLOAT_SCALARS = ("inv_temp", "skip_below")


def signature(fn, dtype, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INPUT_PTRS:
            sig[name] = "*" + dtype
        elif name.startswith("chunk_"):
            sig[name] = "*i64"
        elif name == "idx_ptr":
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def resource_usage(kernel):
    try:
        import triton.backends.nvidia as nv

        tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        line = next(l for l in out.splitlines() if "REG:" in l).split()
        return " ".join(line[:2])
    except Exception as e:  # resource reporting is informative only
        return f"(no resource usage: {type(e).__name__})"


def variants():
    for softmax, dense, scale, grouped, logits in itertools.product((False, True), repeat=5):
        if grouped and logits:
            continue
        yield dict(SOFTMAX=softmax, DENSE_TEACHER=dense, SPARSE=not dense, HAS_SCALE=scale, HAS_BIAS=not logits, GROUPED=grouped,
                   FROM_LOGITS=logits)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"])
    ap.add_argument("--all-configs", action="store_true", help="every autotune config, not only the first")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    kernels = [("fwd", _soft_target_fwd._soft_target_fwd_kernel), ("bwd", _soft_target_bwd._soft_target_bwd_kernel)]
    failures = 0
    for dtype in args.dtypes:
        for v in variants():
            for name, tuned in kernels:
                configs = tuned.configs if args.all_configs else tuned.configs[:1]
                if name == "fwd":
                    extra = [dict(NORM_PASS=False)] + ([dict(NORM_PASS=True)] if v["HAS_SCALE"] else [])
                else:
                    grads = not v["FROM_LOGITS"]
                    extra = [dict(NEED_DX=grads, NEED_DW=grads, NEED_DBIAS=grads, SKIP_SMALL=grads)]
                for e, cfg in itertools.product(extra, configs):
                    consts = dict(v, **e, IEEE=dtype == "fp32", **cfg.kwargs)
                    src = ASTSource(fn=tuned.fn, signature=signature(tuned.fn, dtype, consts), constexprs=consts)
                    label = f"{dtype} {name} {e} {v} {cfg.kwargs} warps={cfg.num_warps}"
                    try:
                        k = triton.compile(src, target=target,
                                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                    except Exception as err:
                        failures += 1
                        print("FAIL", label, f"{type(err).__name__}: {err}", flush=True)
                        continue
                    print("ok  ", label, resource_usage(k), flush=True)
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
