"""One training step (forward + backward to x, weight, bias) of sampled softmax against the full softmax, on CPU.

Shape: B=1024, H=512, V=100_000, num_sampled=8192, fp32 (another with --sampled-shape B,H,V,S).
The full softmax is linear_soft_target_loss(mode="softmax") with one-hot targets, on the reference and cpu
backends; the sampled step includes drawing the candidates (log-uniform, unique). "gemm floor" rows time the
three GEMMs a step needs (logits, dx, dW) at the sampled and at the full class count.

Time: pytest-benchmark, 5 rounds of one step after a warm-up step and the memory-measured step; the table shows
the median and the minimum (the machine may be shared, the minimum is the least disturbed). Peak memory: the
process's resident-set high-water mark during one step (VmHWM, reset through /proc/self/clear_refs) minus its
resident set just before: every byte the step makes resident (torch tensors, BLAS scratch, the gradients it leaves),
not only torch's allocations. Gradients are set to None before every step (untimed), so each step allocates its
gradients afresh.

    python -m pytest benchmarks/bench_sampled_softmax.py --benchmark-enable [--sampled-shape 1024,512,100000,8192]
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Iterator, Tuple

import pytest
import torch

import kc_kernels
from benchmarks.common import peak_memory_mb
from kc_kernels import dispatch

RESULTS_FILE = Path(__file__).parent / "results" / "sampled_softmax_cpu.json"
_rows = {}


def peak_step_mb(step, clear) -> float:
    """Resident memory the step adds at its peak, MB (see the module docstring)."""
    clear()  # gradients of an earlier step would otherwise sit in the baseline and be freed during the step
    return peak_memory_mb(step, torch.device("cpu"))


@pytest.fixture(scope="module")
def shape(request: pytest.FixtureRequest) -> Tuple[int, int, int, int]:
    """(B, H, V, S) from --sampled-shape (benchmarks/conftest.py)."""
    return request.config.getoption("--sampled-shape")


@pytest.fixture(scope="module")
def inputs(shape) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, V, _ = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
    b = torch.zeros(V).requires_grad_()
    # Zipf-like labels, as the log-uniform sampler assumes (ids sorted by frequency)
    labels = torch.multinomial(kc_kernels.samplers.class_probabilities("log_uniform", V).float(), B,
                               replacement=True, generator=g)
    return x, w, b, labels


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest, shape) -> Iterator[None]:
    B, H, V, S = shape
    yield
    if not _rows:
        return
    floor = {k: r["ms"] for k, r in _rows.items() if k.startswith("gemm floor")}
    lines = [f"sampled softmax training step, B={B} H={H} V={V} S={S} fp32, {torch.get_num_threads()} threads",
             f"{'case':<22}{'median ms':>11}{'min ms':>9}{'peak MB':>9}{'x floor':>9}"]
    for name, r in _rows.items():
        ref = floor.get("gemm floor (S)" if name.startswith("sampled") else "gemm floor (V)")
        ratio = f"{r['ms'] / ref:.2f}" if ref and r["ms"] == r["ms"] and not name.startswith("gemm") else ""
        lines.append(f"{name:<22}{r['ms']:>11.1f}{r['min_ms']:>9.1f}{r['peak_mb']:>9.1f}{ratio:>9}")
    writer = request.config.pluginmanager.get_plugin("terminalreporter")
    for line in [""] + lines:
        writer.write_line(line) if writer else print(line)
    if all(r["ms"] == r["ms"] for r in _rows.values()):  # only timed runs (--benchmark-enable) are saved
        RESULTS_FILE.parent.mkdir(exist_ok=True)
        RESULTS_FILE.write_text(json.dumps({
            "shape": dict(B=B, H=H, V=V, S=S, dtype="float32"),
            "machine": dict(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                            torch=torch.__version__, load_avg=os.getloadavg()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "peak_mb_means": "resident-set high-water during one step minus resident set before it",
            "rows": _rows}, indent=1) + "\n")


def _make_step(case: str, inputs, shape):
    """(step, clear): clear drops the gradients, so that every step allocates its own."""
    x, w, b, labels = inputs
    B, _, V, S = shape

    def clear():
        x.grad = w.grad = b.grad = None
    if case.startswith("gemm floor"):
        n = S if case.endswith("(S)") else V
        ws = w.detach()[:n]
        xd = x.detach()

        def step():
            logits = xd @ ws.t()
            _ = logits @ ws
            _ = logits.t() @ xd
        return step, clear

    kind, backend, *rest = case.split("/")
    sparse = rest == ["sparse"]
    try:
        dispatch.resolve("sampled_softmax_loss" if kind == "sampled" else "linear_soft_target_loss", backend,
                         x.device)
    except (NotImplementedError, RuntimeError) as e:
        pytest.skip(str(e))
    gen = torch.Generator().manual_seed(0)
    ones = torch.ones(B, 1)

    def step():
        if kind == "sampled":
            loss = kc_kernels.sampled_softmax_loss(x, w, b, labels, num_sampled=S, generator=gen, backend=backend,
                                                   sparse_grad=sparse)
        else:
            loss = kc_kernels.linear_soft_target_loss(x, w, b, target_index=labels[:, None], target_value=ones,
                                                      mode="softmax", backend=backend)
        loss.backward()
    return step, clear


CASES = ["gemm floor (S)", "sampled/cpu", "sampled/cpu/sparse", "sampled/reference",
         "gemm floor (V)", "full/cpu", "full/reference"]


@pytest.mark.parametrize("case", CASES)
def test_training_step(benchmark, inputs, shape, case) -> None:
    B, H, V, S = shape
    step, clear = _make_step(case, inputs, shape)
    step()  # warm-up outside the memory measurement (first-touch of lazily built state)
    peak = peak_step_mb(step, clear)
    benchmark.extra_info.update(peak_mb=peak, shape=dict(B=B, H=H, V=V, S=S))
    benchmark.pedantic(step, setup=clear, rounds=5, iterations=1, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    nan = float("nan")
    _rows[case] = dict(ms=stats.stats.median * 1e3 if stats is not None else nan,
                       min_ms=stats.stats.min * 1e3 if stats is not None else nan, peak_mb=peak)
    clear()
