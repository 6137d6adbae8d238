#!/usr/bin/env bash
# Fills benchmarks/wheels/ (ignored by git) with the wheels that benchmarks/gpu.sh installs on a GPU machine without
# network, each only where its package is missing there: pybind11 and ninja for the extension build, Liger-Kernel
# and Cut Cross-Entropy as peers of the benchmark table.
#   bash benchmarks/fetch_wheels.sh [PYTHON_VERSION]      # default 3.12, the lent GPU machines' Python
# PyPI's cut-cross-entropy (25.1.1) predates its bias argument and its cce_exact preset: the check runs cce-exact as
# impl="cce", filter_eps=None there (the same computation), or takes a wheel built from its repository put there
# instead (pip wheel --no-deps -w benchmarks/wheels <checkout>). What each wheel requires: docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p benchmarks/wheels
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${1:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d benchmarks/wheels pybind11 ninja liger-kernel
if ! ls benchmarks/wheels/cut_cross_entropy-*.whl >/dev/null 2>&1; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d benchmarks/wheels cut-cross-entropy
fi
ls -l benchmarks/wheels
