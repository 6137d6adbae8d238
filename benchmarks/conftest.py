"""Command-line options of the benchmark modules (pytest benchmarks/...)."""
import pytest


def _shape(text: str) -> tuple:
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--sampled-shape: expected four positive integers B,H,V,S, got {text!r}")
    return tuple(int(p) for p in parts)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--sampled-shape", type=_shape, default=_shape("1024,512,100000,8192"), metavar="B,H,V,S",
                     help="batch, hidden size, classes and sampled classes of bench_sampled_softmax.py")
