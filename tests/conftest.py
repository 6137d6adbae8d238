import os

import torch

# Triton kernels run on CPU only under the interpreter, which must be chosen before any @triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def pytest_collection_modifyitems(config, items):
    """compile_check tests (minutes of compiling for a GPU that need not be here) run only when -m names them."""
    if "compile_check" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="compiles kernels for minutes: select with -m compile_check")
    for item in items:
        if "compile_check" in item.keywords:
            item.add_marker(skip)
