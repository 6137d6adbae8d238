"""The backend table: which implementation runs each op on which backend, devices and dtypes, in one place.

Every row is a frozen record (``Row``) that names its code as "module:attr" strings; nothing is imported until a
call needs it (``import kc_kernels`` never imports triton), and a row's objects are loaded once and kept. The op
fronts (kc_kernels/ops/) call ``resolve`` with the backend a caller asked for, or ``auto``; the custom ops, which
receive the backend as a string, look their epilogue up here with ``epilogue``. To add a backend to an op, add a row.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, FrozenSet, Optional, Tuple

import torch

OPS = ("linear_soft_target_loss", "soft_target_loss", "sampled_softmax_loss")
BACKEND_NAMES = ("reference", "cpu", "triton", "cuda", "portable")
BACKENDS = BACKEND_NAMES + ("auto",)

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
HALF_AND_SINGLE = (torch.float32, torch.float16, torch.bfloat16)

# Capabilities a row may declare (what the code around it may rely on).
# its teacher pass (modes with a teacher log-sum-exp) does the front's NaN check of a dense teacher
TEACHER_NAN = "reports a NaN teacher from its teacher phase"
INTERPRETED_ON_CPU = "takes CPU tensors under TRITON_INTERPRET=1"  # how the Triton kernels run in CPU tests
CAPABILITIES = frozenset({TEACHER_NAN, INTERPRETED_ON_CPU})

# Features of a problem that not every row implements yet (the op front names the ones a call uses; ``auto`` passes
# over a row without them, a named backend without them is refused naming the argument). The keys are the feature,
# the values the argument that asks for it.
FEATURES: Dict[str, str] = {
    "mode:kl": "mode",
    "mode:reverse_kl": "mode",
    "mode:jsd": "mode",
    "teacher_head": "teacher_x",
    "sparse_teacher_tail": "target_index",  # top-K teacher probabilities under reverse_kl / jsd
    "softcap": "softcap",
    "z_loss": "z_loss",
    "label_smoothing": "label_smoothing",
    "return_lse": "return_lse",  # the per-row log-sum-exps as a second result
    "hard_mix": "weight_hard",  # linear_distillation_loss's hard-label term in the soft term's walk
}
ALL_FEATURES = frozenset(FEATURES)


@dataclass(frozen=True)
class Row:
    """One implementation of one op on one backend.

    ``implementation`` is what the op front calls with the validated problem and the backend's name;
    ``epilogue`` is the backend's part that the shared implementation calls (a chunked-driver Epilogue for the
    soft-target ops, a SampledSoftmaxImpl for sampled softmax), None where the implementation is all of it."""

    op: str
    backend: str
    implementation: str  # "module:attr"
    epilogue: Optional[str]  # "module:attr"
    devices: Tuple[str, ...]  # device types of the tensors it takes
    dtypes: Tuple[torch.dtype, ...]  # input dtypes it takes; ``auto`` passes over a row for any other
    capabilities: FrozenSet[str] = frozenset()
    features: FrozenSet[str] = frozenset()  # of FEATURES: what it implements beyond the two base modes

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"Row.op: unknown op {self.op!r}")
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"Row.backend: unknown backend {self.backend!r}")
        for what, ref in (("implementation", self.implementation), ("epilogue", self.epilogue)):
            if ref is not None and (ref.count(":") != 1 or not all(ref.split(":"))):
                raise ValueError(f"Row.{what}: expected 'module:attr', got {ref!r}")
        unknown = set(self.capabilities) - CAPABILITIES
        if unknown:
            raise ValueError(f"Row.capabilities: unknown {sorted(unknown)}")
        unknown = set(self.features) - ALL_FEATURES
        if unknown:
            raise ValueError(f"Row.features: unknown {sorted(unknown)}")

    def takes(self, device_type: str) -> bool:
        return device_type in self.devices or (
            device_type == "cpu" and INTERPRETED_ON_CPU in self.capabilities
            and os.environ.get("TRITON_INTERPRET") == "1")


_REF = "kc_kernels.ops._reference_backend"
_CHUNKED = "kc_kernels.chunked"
_SAMPLED = "kc_kernels.ops.sampled_softmax_autograd:run"
_ANY_DEVICE = ("cpu", "cuda", "meta")
_TRITON = frozenset({INTERPRETED_ON_CPU})
# the features of the chunked backends (the driver makes a head's and a top-K teacher's chunks; each epilogue does
# the modes and options)
_DRIVER_FEATURES = ALL_FEATURES

TABLE: Tuple[Row, ...] = (
    Row("linear_soft_target_loss", "reference", f"{_REF}:linear_soft_target_loss", None, _ANY_DEVICE, ALL_DTYPES,
        features=ALL_FEATURES - {"hard_mix"}),
    Row("soft_target_loss", "reference", f"{_REF}:soft_target_loss", None, _ANY_DEVICE, ALL_DTYPES,
        features=ALL_FEATURES - {"hard_mix"}),
    Row("sampled_softmax_loss", "reference", f"{_REF}:sampled_softmax_loss", None, _ANY_DEVICE, ALL_DTYPES),
    Row("linear_soft_target_loss", "cpu", f"{_CHUNKED}:linear_soft_target_loss", "kc_kernels.cpu.epilogue:EPILOGUE",
        ("cpu",), ALL_DTYPES, frozenset({TEACHER_NAN}), features=_DRIVER_FEATURES),
    Row("soft_target_loss", "cpu", f"{_CHUNKED}:soft_target_loss", "kc_kernels.cpu.epilogue:EPILOGUE",
        ("cpu",), ALL_DTYPES, frozenset({TEACHER_NAN}), features=_DRIVER_FEATURES - {"teacher_head", "hard_mix"}),
    Row("sampled_softmax_loss", "cpu", _SAMPLED, "kc_kernels.cpu.sampled_softmax:IMPL", ("cpu",), ALL_DTYPES),
    Row("linear_soft_target_loss", "triton", f"{_CHUNKED}:linear_soft_target_loss",
        "kc_kernels.triton.epilogue:EPILOGUE", ("cuda",), HALF_AND_SINGLE, _TRITON, _DRIVER_FEATURES),
    Row("soft_target_loss", "triton", f"{_CHUNKED}:soft_target_loss", "kc_kernels.triton.epilogue:EPILOGUE",
        ("cuda",), HALF_AND_SINGLE, _TRITON, _DRIVER_FEATURES - {"teacher_head", "hard_mix"}),
    # fp64 accumulates in fp64 in the Triton sampled-softmax kernels
    Row("sampled_softmax_loss", "triton", _SAMPLED, "kc_kernels.triton.sampled_softmax:IMPL", ("cuda",), ALL_DTYPES,
        _TRITON),
    Row("linear_soft_target_loss", "cuda", f"{_CHUNKED}:linear_soft_target_loss", "kc_kernels.cuda.epilogue:EPILOGUE",
        ("cuda",), HALF_AND_SINGLE, features=_DRIVER_FEATURES),
    Row("soft_target_loss", "cuda", f"{_CHUNKED}:soft_target_loss", "kc_kernels.cuda.epilogue:EPILOGUE",
        ("cuda",), HALF_AND_SINGLE, features=_DRIVER_FEATURES - {"teacher_head", "hard_mix"}),
    Row("sampled_softmax_loss", "cuda", _SAMPLED, "kc_kernels.cuda.sampled_softmax:IMPL", ("cuda",),
        HALF_AND_SINGLE),
    # plain PyTorch over class chunks, memory-bounded: the fallback where no kernel runs (kc_kernels/portable.py)
    Row("linear_soft_target_loss", "portable", "kc_kernels.portable:linear_soft_target_loss", None, _ANY_DEVICE,
        ALL_DTYPES, features=ALL_FEATURES - {"hard_mix"}),
    Row("soft_target_loss", "portable", "kc_kernels.portable:soft_target_loss", None, _ANY_DEVICE, ALL_DTYPES,
        features=ALL_FEATURES - {"teacher_head", "hard_mix"}),
    # the reference's sampled softmax holds only [B, T + S] logits: already plain PyTorch without a [B, V] tensor
    Row("sampled_softmax_loss", "portable", f"{_REF}:sampled_softmax_loss", None, _ANY_DEVICE, ALL_DTYPES),
)
_ROWS: Dict[Tuple[str, str], Row] = {(r.op, r.backend): r for r in TABLE}
assert len(_ROWS) == len(TABLE), "one row per (op, backend)"

# what ``auto`` tries, in order, for tensors on each device type
AUTO_ORDER = {"cuda": ("triton", "cuda", "portable", "reference")}
AUTO_ORDER_DEFAULT = ("cpu", "portable", "reference")


class Unavailable:
    """A falsy backend status that carries the reason (prints as ``False (reason)``)."""

    def __init__(self, reason: str):
        self.reason = reason

    def __bool__(self) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return other is False or (isinstance(other, Unavailable) and other.reason == self.reason)

    def __hash__(self) -> int:
        return hash(False)

    def __repr__(self) -> str:
        return f"False ({self.reason})"


@lru_cache(maxsize=None)
def _probe(name: str) -> Any:
    """True, or Unavailable(reason): whether backend ``name`` can run in this process."""
    if name in ("reference", "portable"):
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


def backends() -> Dict[str, Any]:
    """{"reference": True, "cpu": True, "triton": ..., "cuda": ...}; a False entry carries its reason."""
    return {name: _probe(name) for name in BACKEND_NAMES}


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


@lru_cache(maxsize=None)
def load(ref: str) -> Any:
    """The object a "module:attr" string names (imported on first use, then kept)."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def row(op: str, backend: str) -> Row:
    try:
        return _ROWS[(op, backend)]
    except KeyError:
        raise NotImplementedError(f"backend {backend!r} does not implement {op}") from None


def epilogue(op: str, backend: str) -> Any:
    """The backend's part of ``op`` (see Row), loaded."""
    ref = row(op, backend).epilogue
    if ref is None:
        raise NotImplementedError(f"backend {backend!r} has no epilogue for {op}")
    return load(ref)


def _missing(r: Row, features: FrozenSet[str]) -> None:
    """ValueError naming the argument of the first feature of ``features`` that row ``r`` lacks."""
    lacking = sorted(features - r.features)
    if lacking:
        f = lacking[0]
        have = [b for b in BACKEND_NAMES if (r.op, b) in _ROWS and f in _ROWS[(r.op, b)].features]
        raise ValueError(f"{FEATURES[f]}: the {r.backend} backend does not implement {f.replace('mode:', 'mode ')} "
                         f"(backends that do: {', '.join(have)})")


def _lookup(op: str, backend: str, device_type: str, dtype: Optional[torch.dtype],
            features: FrozenSet[str] = frozenset()) -> Row:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        status = _probe(backend)
        if not status:
            raise RuntimeError(f"backend {backend!r} is not available: {status.reason}")
        r = row(op, backend)
        _missing(r, features)
        return r
    for name in AUTO_ORDER.get(device_type, AUTO_ORDER_DEFAULT):
        found = _ROWS.get((op, name))
        if (found is not None and _probe(name) and device_type in found.devices
                and (dtype is None or dtype in found.dtypes) and features <= found.features):
            return found
    return row(op, "reference")


@lru_cache(maxsize=None)
def _resolve_cached(op: str, backend: str, device_type: str, dtype: Optional[torch.dtype],
                    features: FrozenSet[str] = frozenset()) -> Row:
    return _lookup(op, backend, device_type, dtype, features)


# the implementations of resolved rows, by their "module:attr": a plain dict, which torch.compile reads as a constant
_IMPLEMENTATIONS: Dict[str, Any] = {}


@torch.compiler.assume_constant_result
def _resolve_name(op: str, backend: str, device_type: str, dtype: Optional[torch.dtype] = None,
                  features: FrozenSet[str] = frozenset()) -> str:
    """The name of the backend that runs ``op``. torch.compile runs this at trace time and keeps the name as a
    constant: the imports and probes behind it are not traceable, and their answer does not change."""
    r = _resolve_cached(op, backend, device_type, dtype, features)
    _IMPLEMENTATIONS[r.implementation] = load(r.implementation)
    return r.backend


def resolve(op: str, backend: str, device: torch.device, dtype: Optional[torch.dtype] = None,
            features: FrozenSet[str] = frozenset()) -> Tuple[str, Row]:
    """(backend name, its row) of the implementation that runs ``op`` for tensors on ``device`` of ``dtype``
    using ``features`` (of FEATURES). With ``auto`` the first available row in AUTO_ORDER that takes the device and
    dtype and implements the features."""
    name = _resolve_name(op, backend, device.type, dtype, features)
    return name, _ROWS[(op, name)]


def implementation(r: Row) -> Any:
    """The loaded implementation of a row that ``resolve`` returned."""
    return _IMPLEMENTATIONS[r.implementation]


def check_inputs(r: Row, name: str, t: torch.Tensor) -> None:
    """ValueError naming the argument when ``t`` (the op's first input) is on a device or of a dtype the row does
    not take (an explicitly named backend; ``auto`` never picks such a row)."""
    if not r.takes(t.device.type):
        where = "CUDA tensors" if r.devices == ("cuda",) else f"{'/'.join(r.devices)} tensors"
        if INTERPRETED_ON_CPU in r.capabilities:
            where += " (or TRITON_INTERPRET=1)"
        if r.devices == ("cpu",):
            where = "CPU tensors"
        raise ValueError(f"{name}: the {r.backend} backend takes {where}, got a tensor on {t.device}")
    if t.dtype not in r.dtypes:
        dts = [str(d).replace("torch.", "") for d in r.dtypes]
        names = ", ".join(dts[:-1]) + " or " + dts[-1]
        raise ValueError(f"{name}: the {r.backend} backend takes {names}, not {str(t.dtype).replace('torch.', '')} "
                         "(use backend='cpu' or 'reference' for float64)")
