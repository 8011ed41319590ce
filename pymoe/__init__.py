"""pymoe: Mixture-of-Experts layers as Mojo custom ops in MAX graphs, and an expert-offloading runtime."""

from .config import PRESETS, MoEConfig, Preset, get_preset
from .layer import DenseFFN, MoELayer, MoEOutput
from .weights import DenseWeights, MoEWeights

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "DenseFFN",
    "DenseWeights",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "MoEWeights",
    "Preset",
    "get_preset",
]
