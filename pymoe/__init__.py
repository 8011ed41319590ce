"""pymoe: Mixture-of-Experts layers as Mojo custom ops in MAX graphs, and an expert-offloading runtime.

The layer API is imported on first use, so that the offloading tools (`pymoe.offload`), which
need only NumPy and PyTorch, also run where MAX is not installed."""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "PRESETS": ".config", "MoEConfig": ".config", "Preset": ".config", "get_preset": ".config",
    "DenseFFN": ".layer", "MoELayer": ".layer", "MoEOutput": ".layer", "DeviceGraph": ".runtime",
    "DenseWeights": ".weights", "MoEWeights": ".weights",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name in ("reference", "ops", "hf", "layer", "config", "weights", "runtime", "routing", "dtypes"):
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pymoe' has no attribute {name!r}")
