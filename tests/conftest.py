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
