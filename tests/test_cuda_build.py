"""Every CUDA source (csrc/cuda/*.cu) compiles with nvcc for the GPUs the build targets, sm_80 (A100) and sm_90
(H100/H200); no GPU is needed, so this runs wherever nvcc is. The files compile in parallel, each with nvcc's own
per-architecture threads, into a temporary folder; a failure reports nvcc's output. Skipped where nvcc is absent.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


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


def compile_source(src: Path, out_dir: Path):
    """(source, nvcc's exit status, its output). Host code unoptimised: only whether it compiles matters here,
    and the device code is optimised by ptxas whatever the host flags."""
    cmd = [NVCC, "-c", str(src), "-o", str(out_dir / (src.name + ".o")), "-std=c++17", "--threads", "0",
           "-Xcompiler", "-fPIC", f"-I{ROOT / 'csrc'}", *GENCODE]
    run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return src, run.returncode, run.stdout


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (NVCC, PATH, CUDA_HOME): the CUDA sources cannot be compiled")
def test_every_cuda_source_compiles_for_sm80_and_sm90(tmp_path):
    assert SOURCES, "no csrc/cuda/*.cu found"
    with ThreadPoolExecutor(max_workers=len(SOURCES)) as pool:
        results = list(pool.map(lambda src: compile_source(src, tmp_path), SOURCES))
    failures = [f"--- {src.relative_to(ROOT)} (exit {rc}):\n{out}" for src, rc, out in results if rc != 0]
    if failures:
        pytest.fail("nvcc failed:\n" + "\n".join(failures), pytrace=False)
