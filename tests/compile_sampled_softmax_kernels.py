"""Compile the sampled-softmax Triton kernels for a CUDA target without a GPU (through ptxas).

The interpreter runs programs that the compiler may reject, so on machines without a GPU this is the check that
the kernels build: ``python tests/compile_sampled_softmax_kernels.py [--arch 90] [--dtypes bf16 fp16 fp32 fp64]``.
Run it without TRITON_INTERPRET=1. Block sizes are the ones the launcher uses on a GPU.
"""
import argparse
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this compiles the kernels")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kc_kernels.triton import _sampled_softmax_kernels as K  # noqa: E402
from kc_kernels.triton.sampled_softmax import BLOCK_CAPS  # noqa: E402

INPUT_DTYPE_PTRS = ("x_ptr", "w_ptr", "bias_ptr")
INDEX_PTRS = ("ids_ptr", "labels_ptr")
FLAG_PTRS = ("last_ptr",)  # int8 per sampled position


def signature(fn, dtype: str, acc: str, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INPUT_DTYPE_PTRS:
            sig[name] = "*" + dtype
        elif name in INDEX_PTRS:
            sig[name] = "*i64"
        elif name in FLAG_PTRS:
            sig[name] = "*i8"
        elif name.endswith("_ptr"):
            sig[name] = "*" + acc
        else:
            sig[name] = "i32"
    return sig


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32", "fp64"])
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    bb, bs, bh = BLOCK_CAPS
    blocks = dict(BLOCK_B=bb, BLOCK_S=bs, BLOCK_H=bh)
    failures = 0
    for dtype in args.dtypes:
        acc, acc_tl = ("fp64", tl.float64) if dtype == "fp64" else ("fp32", tl.float32)
        common = dict(IEEE=dtype in ("fp32", "fp64"), ACC=acc_tl, **blocks)
        jobs = []
        for bias, log_q, hits in itertools.product((False, True), (False, True), ("none", "all", "tensorflow")):
            flags = dict(HAS_BIAS=bias, SUBTRACT_LOG_Q=log_q, REMOVE_HITS=hits != "none",
                         LAST_COPY_ONLY=hits == "tensorflow")
            jobs += [(K._sampled_softmax_fwd_kernel, flags), (K._sampled_softmax_dlogits_kernel, flags)]
        jobs += [(K._sampled_softmax_dx_kernel, {}), (K._sampled_softmax_dw_kernel, {})]
        for kernel, flags in jobs:
            consts = dict(common, **flags)
            fn = kernel.fn if hasattr(kernel, "fn") else kernel
            label = f"{dtype} {fn.__name__} {flags}"
            src = ASTSource(fn=kernel, signature=signature(kernel, dtype, acc, consts), constexprs=consts)
            try:
                triton.compile(src, target=target, options=dict(num_warps=4))
            except Exception as err:
                failures += 1
                print("FAIL", label, f"{type(err).__name__}: {err}"[:2000], flush=True)
                continue
            print("ok  ", label, flush=True)
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
