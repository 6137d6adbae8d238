"""The GPU benchmark table alone: the ``bench`` step of benchmarks/gpu_check.py, then its report.

    python benchmarks/gpu_soft_target.py [--budget SECONDS] [--out PATH]

The whole GPU check (build, correctness, table, host synchronisations, determinism) is ``bash benchmarks/gpu.sh``.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks import gpu_check  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="120", help="soft time cap of the table in seconds")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/gpu-<device>-<date>.json)")
    args = ap.parse_args(argv)
    os.environ.setdefault("KC_CHECK_VALUES", "0")  # as in a training loop: no value checks reading GPU data
    with tempfile.TemporaryDirectory() as work:
        for step in ("headline", "bench"):  # the headline case, then the rest of the table
            rc = gpu_check.main([step, "--work", work, "--budget", args.budget])
            if rc:
                return rc
        return gpu_check.main(["report", "--work", work] + (["--out", args.out] if args.out else []))


if __name__ == "__main__":
    sys.exit(main())
