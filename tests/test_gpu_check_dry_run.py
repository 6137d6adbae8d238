"""The GPU check's dry run: benchmarks/gpu.sh --dry-run drives benchmarks/gpu_check.py through every step on the
CPU at tiny shapes, so that the prepared GPU run cannot rot between the occasions a GPU is at hand."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DONE = ("pass", "skipped (time cap)")  # a loaded machine may cut a step's tail at its cap; nothing may fail


def test_gpu_check_dry_run_writes_every_step(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHON=sys.executable, TMPDIR=str(tmp_path))
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "ratio" in run.stdout and "correctness" in run.stdout
    report = json.loads(out.read_text())
    assert report["meta"]["dry_run"] and report["build"]["status"].startswith("skipped")
    steps = report["steps"]
    for name in ("correctness", "bench", "syncs", "determinism"):
        assert steps[name]["process"]["rc"] == 0, (name, steps[name].get("log_tail"))
        assert steps[name]["result"]["complete"], name

    corr = steps["correctness"]["result"]
    assert corr["backends"]["cuda"]["available"] is False and corr["backends"]["cuda"]["reason"]
    cpu = [c for c in corr["cases"] if c["backend"] == "cpu"]
    assert cpu[0]["status"] == "pass" and all(c["status"] in DONE for c in cpu), cpu
    assert {c["dtype"] for c in cpu if c["status"] == "pass"} >= {"bf16", "fp32"}
    for c in corr["cases"]:  # every case of every backend under check has a verdict
        assert c["status"] in DONE + ("fail", "error", "unavailable"), c
    assert not [c for c in corr["cases"] if c["status"] in ("fail", "error") and c["backend"] == "cpu"]

    rows = steps["bench"]["result"]["rows"]
    impls = {(r["case"], r["impl"]) for r in rows}
    assert ("sigmoid-k100", "gemm-floor") in impls and ("sigmoid-k100", "kc-cpu") in impls
    assert ("softmax-ce-hard", "cce") in impls and ("softmax-ce-hard", "liger-flce") in impls  # recorded as absent
    timed = [r for r in rows if r["impl"] == "kc-cpu" and r["median_ms"] is not None]
    assert timed and all(r["median_ms"] > 0 and r["ratio"] > 0 for r in timed)

    syncs = steps["syncs"]["result"]["results"]
    assert syncs and all(r["status"] in ("not counted", "skipped (time cap)") for r in syncs), syncs
    det = [r for r in steps["determinism"]["result"]["results"] if r["backend"] == "cpu"]
    assert det[0]["status"] == "pass" and all(r["status"] in DONE for r in det), det
