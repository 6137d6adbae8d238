"""Backend registry: which implementations exist, which can run here, and which one an op call uses.

Each backend is a module exposing functions named after the ops it implements (``linear_soft_target_loss``,
``soft_target_loss``, ``sampled_softmax_loss``), each taking the validated problem built by kc_kernels.ops. Modules
are imported lazily, so ``import kc_kernels`` never imports triton.
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache
from typing import Callable, Dict, Tuple, TypeVar

import torch

BACKEND_MODULES = {
    "reference": "kc_kernels.ops._reference_backend",
    "cpu": "kc_kernels.cpu",
    "triton": "kc_kernels.triton",
    "cuda": "kc_kernels.cuda",
}
BACKENDS = tuple(BACKEND_MODULES) + ("auto",)


class Unavailable:
    """A falsy backend status that carries the reason (prints as ``False (reason)``)."""

    def __init__(self, reason: str):
        self.reason = reason

    def __bool__(self):
        return False

    def __eq__(self, other):
        return other is False or (isinstance(other, Unavailable) and other.reason == self.reason)

    def __hash__(self):
        return hash(False)

    def __repr__(self):
        return f"False ({self.reason})"


@lru_cache(maxsize=None)
def _probe(name: str):
    if name == "reference":
        return True
    if name == "cpu":
        try:
            from kc_kernels import _C  # noqa: F401
        except ImportError as e:
            return Unavailable(f"compiled CPU extension kc_kernels._C not importable: {e}")
        return True
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return Unavailable(f"triton not installed ({e})")
        if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            return True
        return Unavailable("triton is installed but there is no CUDA device (TRITON_INTERPRET=1 runs it on CPU)")
    if name == "cuda":
        try:
            from kc_kernels import _cuda
        except ImportError as e:
            return Unavailable(f"CUDA library kc_kernels._cuda was not built (nvcc absent or KC_CUDA=0): {e}")
        n = _cuda.device_count()
        if n <= 0:
            why = _cuda.error_string(-n) if n < 0 else "no device"
            return Unavailable(f"kc_kernels._cuda is built but no CUDA device can be used ({why})")
        return True
    raise KeyError(name)


def backends() -> Dict[str, object]:
    """{"reference": True, "cpu": True, "triton": ..., "cuda": ...}; a False entry carries its reason."""
    return {name: _probe(name) for name in BACKEND_MODULES}


def built_libraries() -> Dict[str, bool]:
    """Which compiled libraries exist in this install, whether or not a device can run them."""
    out = {}
    for mod in ("_C", "_cuda"):
        try:
            importlib.import_module(f"kc_kernels.{mod}")
            out[mod] = True
        except ImportError:
            out[mod] = False
    return out


_Registered = TypeVar("_Registered")


def registered(registry: Dict[str, _Registered], backend: str, op_module: str) -> _Registered:
    """``registry[backend]``: what a backend's op module registers on import (an epilogue, a sampled-softmax impl),
    importing ``<backend package>.<op_module>`` first when it has not registered itself yet."""
    if backend not in registry:
        importlib.import_module(f"{BACKEND_MODULES[backend]}.{op_module}")
    return registry[backend]


OP_MODULES = {
    "linear_soft_target_loss": "soft_target",
    "soft_target_loss": "soft_target",
    "sampled_softmax_loss": "sampled_softmax",
}


def lazy_ops(package: str) -> Callable[[str], Callable]:
    """A module ``__getattr__`` for a backend package: op ``name`` is looked up in ``package.<its module>``, and an
    op whose module does not exist (yet) is simply absent."""

    def __getattr__(name):
        module = OP_MODULES.get(name)
        if module is None:
            raise AttributeError(name)
        try:
            mod = importlib.import_module(f"{package}.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"{package}.{module}":
                raise AttributeError(name) from None
            raise
        return getattr(mod, name)

    return __getattr__


def _implementation(name: str, op: str):
    try:
        module = importlib.import_module(BACKEND_MODULES[name])
    except ModuleNotFoundError as e:
        if e.name == BACKEND_MODULES[name]:
            return None
        raise
    try:
        return getattr(module, op)
    except AttributeError:
        return None


def _resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype = None) -> Tuple[str, Callable]:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        status = _probe(backend)
        if not status:
            raise RuntimeError(f"backend {backend!r} is not available: {status.reason}")
        fn = _implementation(backend, op)
        if fn is None:
            raise NotImplementedError(f"backend {backend!r} does not implement {op}")
        return backend, fn
    order = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpu", "reference")
    for name in order:
        if _probe(name) and (device.type == "cuda" or name != "triton"):
            fn = _implementation(name, op)
            if fn is not None and (dtype is None or dtype in getattr(fn, "dtypes", (dtype,))):
                return name, fn
    raise RuntimeError(f"no backend implements {op}")  # unreachable: reference implements every op


# implementations by (op, backend name), filled by _resolve_name
_RESOLVED: Dict[Tuple[str, str], Callable] = {}


@torch.compiler.assume_constant_result
def _resolve_name(op: str, backend: str, device_type: str, dtype: torch.dtype = None) -> str:
    """The name of the backend that runs ``op``. torch.compile runs this at trace time and keeps the name as a
    constant: the imports and probes behind it are not traceable, and their answer does not change."""
    name, fn = _resolve(op, backend, torch.device(device_type), dtype)
    _RESOLVED[(op, name)] = fn
    return name


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype = None) -> Tuple[str, Callable]:
    """The (name, function) that runs ``op`` for tensors on ``device``. With ``auto``, an implementation that
    declares the ``dtypes`` it supports (a function attribute) is passed over for any other dtype."""
    name = _resolve_name(op, backend, device.type, dtype)
    return name, _RESOLVED[(op, name)]
