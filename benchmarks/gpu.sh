#!/usr/bin/env bash
# The GPU benchmark set in one call, for a lent GPU machine (torch and triton already installed there):
#   bash benchmarks/gpu.sh            # results land in benchmarks/results/
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q --no-build-isolation -e . 2>&1 | tail -n 3
python -m pytest -q tests -m "gpu or not gpu" -x 2>&1 | tail -n 15
python -m benchmarks --device cuda --shapes paper,llm --repeats 5 --peers eager,cce,liger
python benchmarks/gpu_soft_target.py
