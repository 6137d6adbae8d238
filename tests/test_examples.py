"""The scripts in examples/ run (at reduced sizes, to keep the suite short) and print the numbers they promise:
the fused op equal to eager PyTorch, losses that fall."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = r"([-+0-9.eE]+|nan|inf)"


def _distill_topk(out):
    found = re.findall(rf"^(fused|eager)\s+loss {NUM} -> {NUM}", out, re.M)
    runs = {m: (float(a), float(b)) for m, a, b in found}
    assert set(runs) == {"fused", "eager"}, out
    for i in range(2):  # the same student, targets and steps: the fused loss is the eager one
        assert runs["fused"][i] == pytest.approx(runs["eager"][i], rel=1e-3), runs


def _hard_label(out):
    (diff,) = re.findall(rf"largest difference {NUM}", out)
    assert float(diff) < 1e-5, out
    steps = [float(v) for v in re.findall(rf"^step\s+\d+\s+loss {NUM}", out, re.M)]
    assert len(steps) >= 2 and steps[-1] < 0.5 * steps[0], steps


def _sampled(out):
    (before, after), = re.findall(rf"held-out rows: {NUM} -> {NUM}", out)
    assert float(after) < float(before) - 1.0, out  # sampled training lowers the full softmax's loss


def _distil_lm(out):
    (diff,) = re.findall(rf"largest difference {NUM}", out)
    assert float(diff) < 1e-5, out  # the fused teacher-head loss equals eager's at the first step
    ((a, b),) = re.findall(rf"^loss {NUM} -> {NUM}", out, re.M)
    assert float(b) < 0.95 * float(a), out


CASES = {
    "distill_topk.py": (["--vocab", "4000", "--steps", "4", "--batch", "4", "--seq", "16"], _distill_topk),
    "hard_label_cross_entropy.py": (["--classes", "3000", "--steps", "10"], _hard_label),
    "sampled_softmax_100k.py": (["--steps", "15", "--num-sampled", "256"], _sampled),
    "distil_lm.py": (["--vocab", "1000", "--steps", "20"], _distil_lm),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_and_prints_what_it_promises(script):
    args, check = CASES[script]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script)] + args, cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    check(run.stdout)


def test_every_example_is_tested():
    scripts = {f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py")}
    assert scripts == set(CASES)
