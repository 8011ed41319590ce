"""Weight containers for the MoE layer and the dense baseline, and their layouts.

Layouts (row-major, "x @ W" convention, the same for every implementation):

  router  [d_model, E]              logits = x @ router
  w1      [E, d_model, N1]          N1 = MoEConfig.expert_n (ExpertShape.w1_cols):
                                    relu:   N1 = d_ff,   h = relu(x @ w1[e])
                                    swiglu: N1 = 2*d_ff, w1[e] = [W_gate | W_up],
                                            h = silu(x @ W_gate) * (x @ W_up)
  w2      [E, d_ff, d_model]        y = h @ w2[e]

Dense baseline: w1 [d_model, N1_dense], w2 [d_ff_dense, d_model] with
d_ff_dense = E * d_ff, so that it has the experts' parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import MoEConfig


def _check(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    if array.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64, got {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")


@dataclass(frozen=True)
class MoEWeights:
    router: np.ndarray
    w1: np.ndarray
    w2: np.ndarray

    def validate(self, config: MoEConfig) -> None:
        """Raise a clear error unless the shapes match `config` and every value is finite."""
        d, e, f = config.d_model, config.num_experts, config.d_ff
        _check("router weights", self.router, (d, e))
        _check("w1", self.w1, (e, d, config.expert_n))
        _check("w2", self.w2, (e, f, d))

    @classmethod
    def from_swiglu(
        cls, router: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray
    ) -> MoEWeights:
        """Build from separate gate [E, d, F], up [E, d, F] and down [E, F, d] weights."""
        return cls(router, np.concatenate([w_gate, w_up], axis=2), w_down)

    @classmethod
    def random(cls, config: MoEConfig, seed: int | None = None, dtype=np.float32) -> MoEWeights:
        """Scaled Gaussian weights (std 1/sqrt(fan_in)), so activations stay O(1)."""
        rng = np.random.default_rng(seed)
        d, e, f = config.d_model, config.num_experts, config.d_ff

        def gauss(shape, fan_in):
            return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(dtype)

        return cls(gauss((d, e), d), gauss((e, d, config.expert_n), d), gauss((e, f, d), f))

    @property
    def nbytes(self) -> int:
        return self.router.nbytes + self.w1.nbytes + self.w2.nbytes


@dataclass(frozen=True)
class DenseWeights:
    w1: np.ndarray
    w2: np.ndarray

    def validate(self, config: MoEConfig) -> None:
        d, f = config.d_model, config.d_ff_dense
        _check("dense w1", self.w1, (d, config.dense_shape.w1_cols))
        _check("dense w2", self.w2, (f, d))

    @classmethod
    def random(cls, config: MoEConfig, seed: int | None = None, dtype=np.float32) -> DenseWeights:
        rng = np.random.default_rng(seed)
        d, f = config.d_model, config.d_ff_dense
        w1 = rng.standard_normal((d, config.dense_shape.w1_cols), dtype=np.float32) / np.sqrt(d)
        w2 = rng.standard_normal((f, d), dtype=np.float32) / np.sqrt(f)
        return cls(w1.astype(dtype), w2.astype(dtype))

    @property
    def nbytes(self) -> int:
        return self.w1.nbytes + self.w2.nbytes
