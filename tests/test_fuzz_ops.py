"""The fuzz of tests/fuzz_ops.py at a fast size, in a subprocess (a crash is reported with the case that reproduces
it), plus regression tests of what it found. KC_FUZZ=N runs N cases on cpu + reference (and N // 30 on triton):

    KC_FUZZ=10000 python -m pytest -q tests/test_fuzz_ops.py -s
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import kc_kernels
from tests.fuzz_ops import FAILURES, drive

LONG = int(os.environ.get("KC_FUZZ", "0"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cases: int, seed: int, backends, **env):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        report = drive(cases, seed, backends)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    print(json.dumps({k: v for k, v in report.items() if k != "failures"}))
    return report


def _assert_clean(report):
    bad = {k: report[k] for k in FAILURES if report[k]}
    assert not bad, f"{bad}; first failures:\n" + "\n".join(
        f"  case {f['case']} {f['outcome']}: {f['detail'].splitlines()[0] if f['detail'] else ''}\n    {f['repro']}"
        for f in report["failures"][:10])


def test_fuzz_cpu_and_reference():
    report = _run(LONG or 250, 7, ["cpu", "reference"])
    assert report["calls"] == (LONG or 250) and report["match"] > 0 and report["expected_error"] > 0
    _assert_clean(report)


@pytest.mark.skipif(not kc_kernels.backends()["triton"], reason="triton cannot run here")
def test_fuzz_triton():
    _assert_clean(_run(LONG // 30 if LONG else 6, 8, ["triton"]))


def test_a_crash_is_counted_with_its_repro():
    report = _run(3, 7, ["reference"], KC_FUZZ_CRASH_AT="1")
    assert report["crash"] == 1 and report["calls"] == 3
    crash = next(f for f in report["failures"] if f["outcome"] == "crash")
    assert crash["case"] == 1 and "--case 1 " in crash["repro"]


def test_cpu_per_class_scale_without_its_gradient():
    # found by the fuzz: a per-class scale that needs no gradient while the logits do made the C++ epilogue add
    # the scale gradient through a null pointer (a segfault), so this runs in its own process
    code = ("import torch, kc_kernels\n"
            "u = torch.randn(2, 5, requires_grad=True)\n"
            "kw = dict(target_index=torch.tensor([[1], [-1]]), target_value=torch.ones(2, 1),\n"
            "          scale=torch.rand(5) + 0.5)\n"
            "for b in ('cpu', 'reference'):\n"
            "    print(torch.autograd.grad(kc_kernels.soft_target_loss(u, backend=b, **kw), u)[0].tolist())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got, want = (torch.tensor(json.loads(line)) for line in out.stdout.split("\n")[:2])
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_unchecked_out_of_range_indices_act_as_padding_on_every_backend(monkeypatch):
    # found by the fuzz: with KC_CHECK_VALUES=0 the reference backend raised on an index >= V instead of ignoring it
    monkeypatch.setenv("KC_CHECK_VALUES", "0")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 4, generator=g), torch.randn(6, 4, generator=g)
    val = torch.rand(3, 2, generator=g)
    wild = torch.tensor([[1, 6], [9, -1], [-5, 2]])
    tame = torch.tensor([[1, -1], [-1, -1], [-1, 2]])
    for backend in ("reference", "cpu"):
        got = kc_kernels.linear_soft_target_loss(x, w, target_index=wild, target_value=val, backend=backend)
        want = kc_kernels.linear_soft_target_loss(x, w, target_index=tame, target_value=val, backend=backend)
        assert torch.equal(got, want), backend
