"""The ``cuda`` backend: kernels compiled by nvcc into kc_kernels._cuda (csrc/cuda). Each op family lives in its own
module; an op whose module does not exist is simply not implemented by this backend (kc_kernels.dispatch then falls
back or reports it)."""
from kc_kernels.dispatch import lazy_ops

__getattr__ = lazy_ops(__name__)
