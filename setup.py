"""Build of kc's compiled kernels.

* ``kc_kernels._C``: C++17 / OpenMP CPU kernels (always built).
* ``kc_kernels._cuda``: CUDA C++ kernels compiled by nvcc into their own extension (KC_CUDA=0 skips, KC_CUDA=1
  requires nvcc, default: built whenever nvcc is found; a compile error then fails the install).

csrc uses no torch headers: launchers take raw pointers and a stream, so the build does not depend on the
installed torch version and never pulls torch into pip's build isolation.
"""
import glob
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

ParallelCompile("KC_BUILD_JOBS", default=0).install()

CUDA_ARCHS = ["80", "90"]  # A100 and H100/H200 natively, plus PTX of the newest, so later GPUs JIT it


def find_nvcc() -> Optional[str]:
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if not nvcc:
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        candidate = os.path.join(home, "bin", "nvcc")
        nvcc = candidate if os.path.exists(candidate) else None
    return os.path.realpath(nvcc) if nvcc else None


def cuda_lib_dir(nvcc: str) -> str:
    # nvcc may be a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc), so look in several roots
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), os.path.dirname(os.path.dirname(nvcc)),
             "/usr/local/cuda"]
    subs = ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
            os.path.join("targets", "sbsa-linux", "lib"))
    for root in filter(None, roots):
        for sub in subs:
            d = os.path.join(root, sub)
            if os.path.exists(os.path.join(d, "libcudart_static.a")):
                return d
    raise RuntimeError(f"libcudart_static.a not found for {nvcc}: set CUDA_HOME to the CUDA toolkit")


def run_nvcc(cmd) -> None:
    print(" ".join(cmd), flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.stdout:
        print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout)


class KcBuildExt(build_ext):
    """build_ext that first compiles an extension's ``cuda_sources`` with nvcc into objects it links."""

    def build_extension(self, ext) -> None:
        cuda_sources = getattr(ext, "cuda_sources", [])
        if cuda_sources:
            nvcc = ext.nvcc
            os.makedirs(self.build_temp, exist_ok=True)
            gencode = []
            for arch in CUDA_ARCHS:
                gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
            gencode += ["-gencode", f"arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}"]
            cmds = []
            for src in cuda_sources:
                obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
                cmds.append([nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "--threads", "0",
                             "-Xcompiler", "-fPIC", "-Icsrc", "-lineinfo", *gencode])
                ext.extra_objects.append(obj)
            # one nvcc per source at once: the build takes as long as the slowest file, not their sum
            with ThreadPoolExecutor(max_workers=max(1, min(len(cmds), os.cpu_count() or 1))) as pool:
                list(pool.map(run_nvcc, cmds))
        super().build_extension(ext)


def native_flags() -> List[str]:
    # The extension is built on the machine that runs it, so tune for its CPU (AVX2/AVX-512 lanes for the fused
    # epilogue); KC_NATIVE=0 builds a portable binary instead.
    if os.environ.get("KC_NATIVE", "1") == "0":
        return []
    if platform.machine().lower() in ("x86_64", "amd64"):
        # GCC keeps to 256-bit vectors on AVX-512 CPUs unless told otherwise; the epilogue's exp/log polynomials ran
        # 20-25% faster in 512-bit lanes on a Xeon with AMX (CPUs without AVX-512 ignore the preference)
        return ["-march=native", "-mprefer-vector-width=512"]
    return ["-march=native"]


def extensions() -> List[Pybind11Extension]:
    exts = [
        Pybind11Extension(
            "kc_kernels._C",
            sources=sorted(glob.glob("csrc/cpu/*.cpp")),
            include_dirs=["csrc"],
            # no-trapping-math lets the compiler if-convert the selects of the vector math; inf and NaN keep IEEE
            # semantics
            extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
                                *native_flags()],
            extra_link_args=["-fopenmp"],
            cxx_std=17,
        )
    ]
    mode = os.environ.get("KC_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        sys.exit(f"KC_CUDA must be 0, 1 or auto, got {mode!r}")
    nvcc = find_nvcc() if mode != "0" else None
    if mode == "1" and nvcc is None:
        sys.exit("KC_CUDA=1 but nvcc was not found (set NVCC or CUDA_HOME)")
    if nvcc is not None:
        ext = Pybind11Extension(
            "kc_kernels._cuda",
            sources=["csrc/cuda/bindings.cpp"],
            include_dirs=["csrc"],
            library_dirs=[cuda_lib_dir(nvcc)],
            # static cudart: the library loads beside any torch build, with or without a system CUDA runtime
            libraries=["cudart_static", "rt", "dl", "pthread"],
            extra_compile_args=["-O3"],
            cxx_std=17,
        )
        ext.cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        ext.nvcc = nvcc
        exts.append(ext)
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": KcBuildExt})
