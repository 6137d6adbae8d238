"""The ``cpu`` backend. Each op lives in its own module; an op whose module does not exist yet is simply not
implemented by this backend (kc_kernels.dispatch then falls back or reports it)."""
import importlib

_OP_MODULES = {
    "linear_soft_target_loss": "soft_target",
    "soft_target_loss": "soft_target",
    "sampled_softmax_loss": "sampled_softmax",
}


def __getattr__(name):
    module = _OP_MODULES.get(name)
    if module is None:
        raise AttributeError(name)
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{module}":
            raise AttributeError(name) from None
        raise
    return getattr(mod, name)
