"""Every CUDA source (csrc/cuda/*.cu) compiles with nvcc for the GPUs the build targets, sm_80 (A100) and sm_90
(H100/H200); no GPU is needed, so this runs wherever nvcc is. The files compile in parallel, each with nvcc's own
per-architecture threads, into a temporary folder; a failure reports nvcc's output. Skipped where nvcc is absent.

ptxas reports each kernel's resources (--resource-usage), from which the soft-target epilogue's are checked: no
kernel uses local memory (a stack frame or spilled registers), every instance the launchers dispatch to exists, and
the instances of the sigmoid / softmax modes keep the registers they had before the divergence modes and options
were added (those are compiled as instances of their own, so that the existing ones keep their code). Where
kc_kernels._cuda is built, its launchers' refusals of bad fields are checked too (before any launch: no GPU).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
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
