"""Compile every variant of the soft-target epilogue kernels (kc_kernels/triton/epilogue.py) for a CUDA target
without a GPU, ptxas included.

The interpreter accepts programs the compiler rejects (and the other way round), so this is the check for machines
without a GPU: ``python tests/compile_soft_target_kernels.py [--arch 90] [--dtypes bf16 fp16 fp32] [--wide]``.
It must run without TRITON_INTERPRET=1 (the kernels are compiled, not interpreted). Prints registers and spills.
Block sizes and warps are the ones the launchers use on a GPU. ``--wide`` also compiles every variant with 64-bit
plane sizes (rows * G elements of the states and consts, the integers that can pass 2^31; Triton then passes them
as int64).
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
from kc_kernels.triton import epilogue as E  # noqa: E402

WORK_DTYPE_PTRS = ("S_ptr", "teacher_ptr")  # the scores and the dense teacher: the input dtype
INT32_PTRS = ("idx_ptr", "piece_lo_ptr", "piece_seg_ptr", "seg_of_class_ptr")
FLOAT_SCALARS = ("inv_t", "t2", "beta", "softcap", "inv_softcap", "uniform")
WIDE_INTS = ("plane", "st_plane")  # rows * G: past 2^31 at a large batch of many segments
# the kernels' MODE: sigmoid, softmax (KL runs as softmax), reverse KL, JSD (kc_kernels.triton.loss_modes)
MODES = (0, 1, 3, 4)


def row_configs(every: bool):
    """(BLOCK, num_warps) of the row_stats launches: the launcher picks a power of two between its bounds from the
    mean piece length (the smallest and the largest by default, every one with --all-blocks), at one warp per 256
    columns, 1 to 4 (as row_stats in epilogue.py)."""
    lo = getattr(E, "_MIN_ROW_BLOCK", getattr(E, "_ROW_BLOCK", 1024))
    hi = getattr(E, "_MAX_ROW_BLOCK", lo)
    blocks = [lo] if lo == hi else [lo, hi]
    if every:
        blocks = [lo << i for i in range((hi // lo).bit_length())]
    return [(b, max(1, min(4, b // 256))) for b in blocks]


def kernels(every_block: bool):
    """(name, kernel, block constexprs, num_warps) of every launch configuration."""
    out = [("row_stats", E._row_stats_kernel, {"BLOCK": b, "BLOCK_T": E._TARGET_BLOCK}, w)
           for b, w in row_configs(every_block)]
    out += [("mix", E._mix_kernel, {"BLOCK": b}, w) for b, w in row_configs(every_block)]
    out.append(("final", E._final_kernel, {"BLOCK_R": E.TILE[0], "BLOCK_C": E.TILE[1]}, E._FINAL_WARPS))
    return out


def signature(fn, dtype: str, ints: str, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in WORK_DTYPE_PTRS:
            sig[name] = "*" + dtype
        elif name in INT32_PTRS:
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = ints if name in WIDE_INTS else "i32"
    return sig


def valid(kernel: str, f) -> bool:
    """The flag combinations the launchers can produce (see row_stats, mix and final in epilogue.py)."""
    if kernel == "mix":
        return True
    if f.get("DENSE") and f.get("SPARSE"):
        return False
    mode = f.get("MODE")
    options = f.get("SOFTCAP") or f.get("UNIFORM")
    if options and (mode != 1 or f.get("HAS_SCALE")):  # options of softmax (and KL) without a scale
        return False
    if mode in (3, 4) and (not f.get("DENSE") or f.get("HAS_SCALE")):  # the divergences: a dense teacher, no scale
        return False
    if kernel == "row_stats":
        if f.get("TEACHER"):  # the driver asks for the teacher pass alone (launched as softmax), with a dense teacher
            return mode == 1 and bool(f.get("DENSE")) and not (f.get("NORM") or f.get("STATS") or options)
        if options and not f.get("STATS"):
            return False
        if f.get("NORM") and not f.get("HAS_SCALE"):
            return False
        return bool(f.get("NORM") or f.get("STATS"))
    if f.get("WANT_DBIAS") and not (f.get("HAS_COEF") and f.get("HAS_BIAS")):
        return False
    return not (f.get("WANT_DSCALE") and not (f.get("HAS_COEF") and f.get("HAS_SCALE")))


def variants(kernel: str, fn, blocks):
    """Every valid assignment of the kernel's flags (its constexpr parameters other than block sizes: MODE takes
    the kernels' modes, the others False and True)."""
    names = [n for n, p in zip(fn.arg_names, fn.params) if p.is_constexpr and n not in blocks]
    for values in itertools.product(*[MODES if n == "MODE" else (False, True) for n in names]):
        flags = dict(zip(names, values))
        if valid(kernel, flags):
            yield flags


def resource_usage(kernel):
    try:
        import triton.backends.nvidia as nv

        tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        line = next(ln for ln in out.splitlines() if "REG:" in ln).split()
        return " ".join(line[:2])
    except Exception as e:  # resource reporting is informative only
        return f"(no resource usage: {type(e).__name__})"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"])
    ap.add_argument("--wide", action="store_true", help="also with 64-bit plane sizes")
    ap.add_argument("--all-blocks", action="store_true", help="every row_stats block size, not only the bounds")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    failures = count = 0
    for dtype, ints in itertools.product(args.dtypes, ("i32", "i64") if args.wide else ("i32",)):
        for name, kernel, blocks, warps in kernels(args.all_blocks):
            fn = kernel  # the JITFunction: arg_names and params describe its parameters
            for flags in variants(name, fn, blocks):
                consts = dict(flags, **blocks)
                src = ASTSource(fn=fn, signature=signature(fn, dtype, ints, consts), constexprs=consts)
                label = (f"{dtype} {ints} {name} {'x'.join(map(str, blocks.values()))} w{warps} "
                         + " ".join(k if v is True else f"{k}={v}" for k, v in flags.items() if v or k == "MODE"))
                count += 1
                try:
                    k = triton.compile(src, target=target, options=dict(num_warps=warps))
                except Exception as err:
                    failures += 1
                    print("FAIL", label, f"{type(err).__name__}: {err}"[:2000], flush=True)
                    continue
                print("ok  ", label, resource_usage(k), flush=True)
    print(f"compiled {count - failures} of {count}; failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
