# The compiled CPU kernels (csrc/cpu, pybind11): typed as Any for the type checker.
from typing import Any

def __getattr__(name: str) -> Any: ...
