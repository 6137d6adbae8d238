"""pytest-benchmark suite of the fused linear + soft-target loss: every available backend and the GEMM floor.

    python -m pytest benchmarks/bench_soft_target.py --benchmark-enable [-k paper]

Rows carry extra_info: peak MB (see benchmarks/common.py) and, for the op rows, the floor measured in the same pytest
run. `python -m benchmarks` prints the same measurements as one table and writes JSON.
"""
import pytest
import torch

from benchmarks import common

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPES = [("small", s) for s in common.SHAPES["small"]] + [("paper", s) for s in common.SHAPES["paper"]]
if DEVICE.type == "cuda":
    SHAPES += [("llm", s) for s in common.SHAPES["llm"]]
_floor_ms = {}


def _ids(v):
    if isinstance(v, tuple) and len(v) == 2:
        name, (B, H, V) = v
        return f"{name}-B{B}-H{H}-V{V}"
    return str(v)


@pytest.mark.parametrize("loss", common.LOSSES)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("impl", ["gemm-floor"] + [f"kc-{b}" for b in ("cpu", "triton", "cuda", "reference")])
def test_soft_target(benchmark, impl, shape, loss) -> None:
    _, (B, H, V) = shape
    if impl == "kc-reference" and B * V > 2e9:
        pytest.skip("the reference materialises B x V logits")
    backend = impl[3:]
    if impl != "gemm-floor":
        import kc_kernels

        if not kc_kernels.backends()[backend] or (DEVICE.type == "cpu") != (backend in ("cpu", "reference")):
            pytest.skip(f"backend {backend} does not run on {DEVICE.type} here")
    p = common.make_problem(loss, B, H, V, DEVICE, DTYPE)
    fn = common.floor_fn(p) if impl == "gemm-floor" else common.kc_fn(p, backend)
    benchmark.extra_info["peak_mb"] = common.peak_memory_mb(fn, DEVICE)
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)
    key = (shape, loss)
    if impl == "gemm-floor":
        _floor_ms[key] = benchmark.stats.stats.median * 1e3
    elif key in _floor_ms:
        benchmark.extra_info["floor_ms"] = _floor_ms[key]
        benchmark.extra_info["ratio"] = benchmark.stats.stats.median * 1e3 / _floor_ms[key]
