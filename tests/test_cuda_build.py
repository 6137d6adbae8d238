"""Every CUDA source (csrc/cuda/*.cu) compiles with nvcc for the GPUs the build targets, sm_80 (A100) and sm_90
(H100/H200); no GPU is needed, so this runs wherever nvcc is. The files compile in parallel, each with nvcc's own
per-architecture threads, into a temporary folder; a failure reports nvcc's output. Skipped where nvcc is absent.

ptxas reports each kernel's resources (--resource-usage), from which the soft-target epilogue's are checked: no
kernel uses local memory (a stack frame or spilled registers), every instance the launchers dispatch to exists, and
the instances of the sigmoid / softmax modes keep the registers they had before the divergence modes and options
were added (those are compiled as instances of their own, so that the existing ones keep their code). Where
kc_kernels._cuda is built, its launchers' refusals of bad fields are checked too (before any launch: no GPU).

Last, the kernels' logic runs on the CPU: the sources compiled by the host compiler against csrc/cuda/emulation
and the GPU tests' cases run on them with backend="cuda" (slow: about a minute).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
GENCODE = [arg for arch in ARCHS for arg in ("-gencode", f"arch=compute_{arch[3:]},code={arch}")]


def find_nvcc():
    """As setup.py looks for it: $NVCC, then PATH, then $CUDA_HOME / $CUDA_PATH / /usr/local/cuda."""
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (NVCC, PATH, CUDA_HOME): the CUDA sources "
                                                     "cannot be compiled")


def compile_source(src: Path, out_dir: Path):
    """(source, nvcc's exit status, its output, ptxas's resource report included). Host code unoptimised: only
    whether it compiles matters here, and the device code is optimised by ptxas whatever the host flags."""
    cmd = [NVCC, "-c", str(src), "-o", str(out_dir / (src.name + ".o")), "-std=c++17", "--threads", "0",
           "-Xcompiler", "-fPIC", f"-I{ROOT / 'csrc'}", "--resource-usage", *GENCODE]
    run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return src, run.returncode, run.stdout


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{source name: (exit status, output)} of every CUDA source, compiled once for the tests below."""
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    with ThreadPoolExecutor(max_workers=max(1, len(SOURCES))) as pool:
        results = list(pool.map(lambda src: compile_source(src, out_dir), SOURCES))
    return {src.name: (rc, out) for src, rc, out in results}


@needs_nvcc
def test_every_cuda_source_compiles_for_sm80_and_sm90(compiled):
    assert SOURCES, "no csrc/cuda/*.cu found"
    failures = [f"--- csrc/cuda/{name} (exit {rc}):\n{out}" for name, (rc, out) in compiled.items() if rc != 0]
    if failures:
        pytest.fail("nvcc failed:\n" + "\n".join(failures), pytrace=False)


def kernel_resources(ptxas_output: str):
    """{(mangled entry name, arch): {"registers", "stack", "spill_stores", "spill_loads"}} from ptxas -v."""
    out, key = {}, None
    for line in ptxas_output.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            key = (m.group(1), m.group(2))
            out[key] = {}
            continue
        if key is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[key].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[key]["registers"] = int(m.group(1))
    return out


# The soft-target epilogue's kernels (csrc/cuda/soft_target.cu): templates over the variant (0 the sigmoid / softmax
# code, KL included; 1 softmax with a softcap or a uniform target; 2 reverse KL; 3 JSD), the scores' dtype (3) and
# the teacher's (4).
_KERNEL = re.compile(r"\d+(row_stats_kernel|final_kernel|mix_kernel|teacher_kernel)I")
_VARIANT = re.compile(r"VariantE(\d)E")
_DTYPE_PAIRS = 3 * 4
EXPECTED_INSTANCES = {("row_stats_kernel", v): _DTYPE_PAIRS for v in range(4)}
EXPECTED_INSTANCES.update({("final_kernel", v): _DTYPE_PAIRS for v in range(4)})
EXPECTED_INSTANCES.update({("mix_kernel", None): _DTYPE_PAIRS, ("teacher_kernel", None): 4})
# Registers of the sigmoid / softmax instances (variant 0) as measured with nvcc 13.0 before the new modes (the
# most over their dtype instances; the teacher phase has since moved to a kernel of its own, which lowered
# row_stats). Other toolkits allocate differently: the ceilings hold for that nvcc major version only.
BASE_REGISTER_CEILINGS = {("sm_80", "final_kernel"): 80, ("sm_80", "row_stats_kernel"): 42,
                          ("sm_90", "final_kernel"): 80, ("sm_90", "row_stats_kernel"): 40}
CEILINGS_NVCC_MAJOR = 13


@pytest.fixture(scope="module")
def soft_target_kernels(compiled):
    rc, out = compiled["soft_target.cu"]
    if rc != 0:
        pytest.fail(f"csrc/cuda/soft_target.cu does not compile:\n{out}", pytrace=False)
    kernels = {}
    for (name, arch), res in kernel_resources(out).items():
        m = _KERNEL.search(name)
        if m is None:
            continue
        v = _VARIANT.search(name)
        kernels[(name, arch)] = dict(res, kernel=m.group(1), variant=int(v.group(1)) if v else None)
    return kernels


def _nvcc_major():
    m = re.search(r"release (\d+)\.", subprocess.run([NVCC, "--version"], stdout=subprocess.PIPE, text=True).stdout)
    return int(m.group(1)) if m else None


@needs_nvcc
def test_soft_target_instances_exist_for_every_variant_and_dtype(soft_target_kernels):
    for arch in ARCHS:
        counts = {}
        for (_, a), k in soft_target_kernels.items():
            if a == arch:
                counts[(k["kernel"], k["variant"])] = counts.get((k["kernel"], k["variant"]), 0) + 1
        assert counts == EXPECTED_INSTANCES, arch


@needs_nvcc
def test_soft_target_kernels_use_no_local_memory(soft_target_kernels):
    """No stack frame and no spilled registers in any instance, the new modes' included: local memory in the
    epilogue's loops costs a round trip through L1 per access."""
    assert soft_target_kernels
    bad = [f"{k['kernel']} variant {k['variant']} {arch} ({name}): stack {k['stack']} B, spills "
           f"{k['spill_stores']}/{k['spill_loads']} B"
           for (name, arch), k in soft_target_kernels.items()
           if k.get("stack", 0) or k.get("spill_stores", 0) or k.get("spill_loads", 0)]
    assert not bad, "\n".join(bad)


@needs_nvcc
def test_base_instances_keep_their_registers(soft_target_kernels):
    if _nvcc_major() != CEILINGS_NVCC_MAJOR:
        pytest.skip(f"the register ceilings were measured with nvcc {CEILINGS_NVCC_MAJOR}")
    over = [f"{k['kernel']} {arch} ({name}): {k['registers']} registers > {BASE_REGISTER_CEILINGS[(arch, k['kernel'])]}"
            for (name, arch), k in soft_target_kernels.items()
            if k["variant"] == 0 and k["registers"] > BASE_REGISTER_CEILINGS[(arch, k["kernel"])]]
    assert not over, "\n".join(over)


# ------------------------------------------------------------------------------- the launchers' checks (no GPU)

def _cuda_module():
    try:
        from kc_kernels import _cuda
    except ImportError:
        pytest.skip("kc_kernels._cuda is not built")
    return _cuda


@pytest.mark.parametrize("kernel", ["soft_target_row_stats", "soft_target_final"])
@pytest.mark.parametrize("fields,match", [
    (dict(mode="JSD", beta=1.0), "beta"),
    (dict(mode="JSD", beta=0.0), "beta"),
    (dict(mode="JSD", softcap=2.0), "options of SOFTMAX and KL, not of JSD"),
    (dict(mode="REVERSE_KL", uniform_target=1e-3), "options of SOFTMAX and KL, not of REVERSE_KL"),
    (dict(mode="SIGMOID", softcap=2.0), "not of SIGMOID"),
    (dict(mode="SOFTMAX", softcap=float("nan")), "softcap"),
    (dict(mode="SOFTMAX", softcap=float("inf")), "softcap"),
    (dict(mode="KL", uniform_target=float("nan")), "uniform_target"),
    (dict(mode="KL", uniform_target=1e-3, scale=8), "take no self-paced scale"),
    (dict(mode="JSD", scale=8), "JSD take no self-paced scale"),
    (dict(mode="SOFTMAX", teacher_col0=-1), "teacher_col0"),
    (dict(mode=99), "LOSS_MODES"),
])
def test_launchers_refuse_bad_fields_before_launching(kernel, fields, match):
    """The bindings check the new fields (no device is touched: the ValueError comes before any launch)."""
    _cuda = _cuda_module()
    p = _cuda.RowStatsParams() if kernel == "soft_target_row_stats" else _cuda.FinalParams()
    for k, v in fields.items():
        setattr(p, k, _cuda.LOSS_MODES[v] if k == "mode" and isinstance(v, str) else v)
    with pytest.raises(ValueError, match=match):
        getattr(_cuda, kernel)(p)


@pytest.mark.parametrize("mode,phases,match", [
    ("SOFTMAX", "MIX", "MIX is a phase of JSD only"),
    ("JSD", "MIX", "teacher"),
    ("REVERSE_KL", "STATS", "teacher"),
])
def test_row_stats_refuses_a_mix_or_divergence_without_its_inputs(mode, phases, match):
    _cuda = _cuda_module()
    p = _cuda.RowStatsParams()
    p.mode, p.phases, p.scores = _cuda.LOSS_MODES[mode], _cuda.PHASES[phases], 8
    with pytest.raises(ValueError, match=match):
        _cuda.soft_target_row_stats(p)


# ------------------------------------------------------------- the kernels' logic on the CPU (csrc/cuda/emulation)
#
# Every CUDA source compiled by the host compiler against csrc/cuda/emulation (a CUDA runtime whose launches run a
# block's threads as fibers) and linked with the bindings into a host-only kc_kernels._cuda; a subprocess loads it in
# place of the real one, lets the cuda backend take CPU tensors and runs the GPU tests' cases
# (tests/test_gpu_backends_soft_target.py) with backend="cuda": the kernels' indexing, reductions, state merges and
# the Python launchers are checked without a GPU. (Blocks run one after another: races between blocks, the
# intrinsics' rounding and the performance are left to a GPU.)

EMULATION = ROOT / "csrc" / "cuda" / "emulation"
_LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<([^,]+),\s*([^,]+),[^>]*>>>\(([^;]*)\);")
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _run(cmd):
    run = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return run.returncode, f"$ {' '.join(str(c) for c in cmd)}\n{run.stdout}"


def build_emulated(out_dir: Path) -> Path:
    """The host-only kc_kernels._cuda in ``out_dir``; pytest.fail with the compiler's output if a step fails."""
    import sysconfig

    import pybind11

    flags = ["-std=c++17", "-O1", "-fPIC", "-Wno-attributes"]
    steps, objects = [], []
    for src in SOURCES:
        host = out_dir / f"{src.stem}_host.cpp"
        text = _LAUNCH.sub(r"kc_emulation::launch([&] { \1(\4); }, \2, \3);", src.read_text())
        assert "<<<" not in text, f"{src.name}: a launch the emulation does not rewrite"
        host.write_text(text)
        objects.append(out_dir / f"{src.stem}.o")
        steps.append([CXX, "-c", host, "-o", objects[-1], *flags, "-D__CUDACC__", f"-I{EMULATION}",
                      f"-I{ROOT / 'csrc'}"])
    objects.append(out_dir / "emulator.o")
    steps.append([CXX, "-c", EMULATION / "emulator.cpp", "-o", objects[-1], *flags, f"-I{EMULATION}"])
    objects.append(out_dir / "bindings.o")
    steps.append([CXX, "-c", ROOT / "csrc" / "cuda" / "bindings.cpp", "-o", objects[-1], *flags, f"-I{ROOT / 'csrc'}",
                  f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}"])
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(_run, steps))
    failed = [out for rc, out in results if rc != 0]
    if failed:
        pytest.fail("the emulated build failed:\n" + "\n".join(failed), pytrace=False)
    library = out_dir / f"_cuda{sysconfig.get_config_var('EXT_SUFFIX')}"
    rc, out = _run([CXX, "-shared", *objects, "-o", library])
    if rc != 0:
        pytest.fail(f"the emulated build failed:\n{out}", pytrace=False)
    return library


def _pybind11_missing():
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.slow
@pytest.mark.skipif(CXX is None or _pybind11_missing(), reason="no host C++ compiler or pybind11")
def test_soft_target_kernels_emulated_on_the_cpu(tmp_path):
    library = build_emulated(tmp_path)
    run = subprocess.run([sys.executable, __file__, str(library)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=1800)
    if run.returncode == _SKIPPED:
        pytest.skip(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0 and " 0 failed" in run.stdout, run.stdout[-20000:]


_SKIPPED = 77


def _emulated_cases(T):
    """(name, call, args) of the GPU tests' cases run on the emulated kernels: those of the divergence modes and
    the options (the slowest, in two row blocks, for one teacher or option) and a sample of the sigmoid / softmax
    ones."""
    import itertools

    import torch

    b = "cuda"
    cases = []
    for mode, case, teacher in itertools.product(T.DIV_MODES, T.DIV_CASES, T.DIV_TEACHERS):
        if case == "row_blocks" and teacher != "head":
            continue
        cases.append((f"linear {mode} {case} {teacher}", lambda *a: T.test_divergence_linear_gpu(*a, b),
                      (mode, case, teacher)))
    for mode, case, teacher in itertools.product(T.DIV_MODES, ["segments", "long_segment", "single_row"],
                                                 ["dense", "topk"]):
        cases.append((f"logits {mode} {case} {teacher}", lambda *a: T.test_divergence_logits_gpu(*a, b),
                      (mode, case, teacher)))
    for mode in T.DIV_MODES:
        cases.append((f"weights, beta limits, masks {mode}",
                      lambda *a: T.test_divergence_sample_weight_beta_limits_and_masked_teacher_gpu(*a, b), (mode,)))
    cases.append(("bitwise jsd", lambda *a: T.test_divergence_bitwise_identical_across_calls_gpu(*a, b), ("jsd",)))
    for (mode, teacher), dtype in itertools.product([("kl", "dense"), ("reverse_kl", "topk"), ("jsd", "head")],
                                                    [torch.float16, torch.bfloat16]):
        cases.append((f"half {mode} {teacher} {dtype}", lambda *a: T.test_divergence_half_gpu(*a, b),
                      (mode, teacher, dtype)))
    for case, mode, target, option in itertools.product(["segments", "row_blocks"], ["softmax", "kl"],
                                                        ["sparse", "dense"], T.DIV_OPTIONS):
        if case == "row_blocks" and option != "all":
            continue
        cases.append((f"options {case} {mode} {target} {option}", lambda *a: T.test_options_linear_gpu(*a, b),
                      (case, mode, target, option)))
    for target, option in itertools.product(["sparse", "dense"], T.DIV_OPTIONS):
        cases.append((f"options per phase {target} {option}",
                      lambda *a: T.test_options_logits_walked_per_phase_gpu(*a, b), (target, option)))
    cases.append(("linear_cross_entropy", lambda: T.test_options_of_linear_cross_entropy_gpu(b), ()))
    for args in T.FULL[::4]:
        cases.append((f"base {args}", lambda *a: T.test_linear_every_mode_fp32(*a, b), args))
    for i, case in enumerate(T.ODD):
        for mode in ("sigmoid", "softmax"):
            cases.append((f"base odd {i} {mode}", lambda *a: T.test_linear_odd_cases_fp32(*a, b), (case, mode)))
    for args in T.LOGITS:
        cases.append((f"base logits {args}", lambda *a: T.test_soft_target_loss_fp32(*a, b), args))
    for mode in ("sigmoid", "softmax"):
        cases.append((f"base -inf teacher {mode}", lambda *a: T.test_teacher_logits_with_minus_inf(*a, b), (mode,)))
        cases.append((f"base duplicates {mode}", lambda *a: T.test_duplicate_indices_and_padding_add_up(*a, b),
                      (mode,)))
    for (mode, case), dtype in itertools.product(T.HALF, [torch.float16, torch.bfloat16]):
        cases.append((f"base half {mode} {case} {dtype}", lambda *a: T.test_linear_half(*a, b), (mode, case, dtype)))
    return cases


def _emulated_main(library: str) -> int:
    """In a subprocess: the host-only kc_kernels._cuda at ``library`` in place of the real one, the cuda backend
    on CPU tensors, and the cases of _emulated_cases."""
    import contextlib
    import dataclasses
    import importlib.util
    import types

    sys.path.insert(0, str(ROOT))
    import tests.conftest  # noqa: F401  (TRITON_INTERPRET, as the test session sets it)

    spec = importlib.util.spec_from_file_location("kc_kernels._cuda", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["kc_kernels._cuda"] = module
    import torch

    import kc_kernels
    from kc_kernels import dispatch

    kc_kernels._cuda = module
    torch.cuda.device = lambda device: contextlib.nullcontext()
    torch.cuda.current_stream = lambda device=None: types.SimpleNamespace(cuda_stream=0)
    for key, r in list(dispatch._ROWS.items()):
        if r.backend == "cuda":
            dispatch._ROWS[key] = dataclasses.replace(r, devices=("cuda", "cpu"))
    dispatch._probe.cache_clear()
    dispatch._resolve_cached.cache_clear()
    try:
        import tests.test_gpu_backends_soft_target as T
    except BaseException as e:  # the module skips itself where no GPU backend can run (pytest's Skipped)
        print(f"tests/test_gpu_backends_soft_target.py does not load here: {e}")
        return _SKIPPED
    cases = _emulated_cases(T)
    failures = 0
    for name, call, args in cases:
        try:
            call(*args)
        except Exception as e:
            failures += 1
            print(f"FAILED {name}: {type(e).__name__}: {str(e).strip()[:2000]}")
    print(f"{len(cases)} cases on the emulated kernels, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(_emulated_main(sys.argv[1]))
