"""The scripts in examples/ run (at reduced sizes, to keep the suite short) and reach their own checks."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "distill_topk.py": ["--vocab", "4000", "--steps", "4", "--batch", "4", "--seq", "16"],
    "hard_label_cross_entropy.py": ["--classes", "3000", "--steps", "10"],
    "sampled_softmax_100k.py": ["--steps", "15", "--num-sampled", "256"],
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script)] + CASES[script], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.strip()


def test_every_example_is_tested():
    scripts = {f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py")}
    assert scripts == set(CASES)
