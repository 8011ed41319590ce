"""Weight containers for the MoE layer and the dense baseline, and their layouts.

Layouts (row-major, "x @ W" convention, the same for every implementation):

  router  [d_model, E]              logits = x @ router
  w1      [E, d_model, N1]          N1 = MoEConfig.expert_n (ExpertShape.w1_cols):
                                    relu:   N1 = d_ff,   h = relu(x @ w1[e])
                                    swiglu: N1 = 2*d_ff, w1[e] = [W_gate | W_up],
                                            h = silu(x @ W_gate) * (x @ W_up)
  w2      [E, d_ff, d_model]        y = h @ w2[e]

Optional, present exactly when the MoEConfig asks for them:

  router_bias     [E]               logits = x @ router + router_bias      (router_bias)
  selection_bias  [E]               added to the scores for choosing only  (selection_bias)
  b1              [E, N1]           h = act(x @ w1[e] + b1[e])             (expert_bias)
  b2              [E, d_model]      y = h @ w2[e] + b2[e]                  (expert_bias)
  shared_w1       [d_model, 2*Fs]   the shared SwiGLU expert, [W_gate | W_up], Fs = shared_d_ff
  shared_w2       [Fs, d_model]
  shared_gate     [d_model, 1]      its output is scaled by sigmoid(x @ shared_gate)  (shared_gate)

Dense baseline: w1 [d_model, N1_dense], w2 [d_ff_dense, d_model] with
d_ff_dense = E * d_ff, so that it has the experts' parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import MoEConfig


def _check(name: str, array, shape: tuple[int, ...]) -> None:
    """A weight is a float32/float64 NumPy array, or a float torch tensor (float32,
    bfloat16 or float16, on any device: large layers are generated on the GPU)."""
    if _is_torch(array):
        import torch

        if array.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{name} must be a float32, bfloat16 or float16 tensor, got {array.dtype}")
        finite = bool(torch.isfinite(array).all())
    elif isinstance(array, np.ndarray):
        if array.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name} must be float32 or float64, got {array.dtype}")
        finite = bool(np.isfinite(array).all())
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(array).__name__}")
    if tuple(array.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(array.shape)}, expected {shape}")
    if not finite:
        raise ValueError(f"{name} contains NaN or infinite values")


def _is_torch(array) -> bool:
    return type(array).__module__.startswith("torch")


def optional_weight_shapes(config: MoEConfig) -> dict[str, tuple[int, ...]]:
    """The optional weights `config` asks for (see the module docstring), name -> shape,
    in the order the layer graph takes them after router, w1, w2."""
    d, e = config.d_model, config.num_experts
    shapes = {}
    if config.router_bias:
        shapes["router_bias"] = (e,)
    if config.selection_bias:
        shapes["selection_bias"] = (e,)
    if config.expert_bias:
        shapes["b1"] = (e, config.expert_n)
        shapes["b2"] = (e, d)
    if config.shared_d_ff:
        shapes["shared_w1"] = (d, 2 * config.shared_d_ff)
        shapes["shared_w2"] = (config.shared_d_ff, d)
    if config.shared_gate:
        shapes["shared_gate"] = (d, 1)
    return shapes


OPTIONAL_WEIGHTS = ("router_bias", "selection_bias", "b1", "b2", "shared_w1", "shared_w2", "shared_gate")


@dataclass(frozen=True)
class MoEWeights:
    router: np.ndarray
    w1: np.ndarray
    w2: np.ndarray
    router_bias: np.ndarray | None = None
    selection_bias: np.ndarray | None = None
    b1: np.ndarray | None = None
    b2: np.ndarray | None = None
    shared_w1: np.ndarray | None = None
    shared_w2: np.ndarray | None = None
    shared_gate: np.ndarray | None = None

    def validate(self, config: MoEConfig) -> None:
        """Raise a clear error unless the shapes match `config` (every optional weight it
        asks for present, no other) and every value is finite."""
        d, e, f = config.d_model, config.num_experts, config.d_ff
        _check("router weights", self.router, (d, e))
        _check("w1", self.w1, (e, d, config.expert_n))
        _check("w2", self.w2, (e, f, d))
        wanted = optional_weight_shapes(config)
        for name in OPTIONAL_WEIGHTS:
            value = getattr(self, name)
            if name in wanted:
                if value is None:
                    raise ValueError(f"the config asks for weights.{name} {wanted[name]}, but it is None")
                _check(name, value, wanted[name])
            elif value is not None:
                raise ValueError(f"weights.{name} is given but the config does not use it (see MoEConfig)")

    def graph_inputs(self, config: MoEConfig) -> list[np.ndarray]:
        """router, w1, w2, then the optional weights in optional_weight_shapes order:
        the weight inputs of the layer graph (pymoe.runtime.moe_graph_spec)."""
        return [self.router, self.w1, self.w2, *(getattr(self, n) for n in optional_weight_shapes(config))]

    @classmethod
    def from_swiglu(
        cls, router: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray
    ) -> MoEWeights:
        """Build from separate gate [E, d, F], up [E, d, F] and down [E, F, d] weights."""
        return cls(router, np.concatenate([w_gate, w_up], axis=2), w_down)

    @classmethod
    def random(cls, config: MoEConfig, seed: int | None = None, dtype=np.float32) -> MoEWeights:
        """Scaled Gaussian weights (std 1/sqrt(fan_in)), so activations stay O(1); biases
        with std 0.1 (selection bias 0.01, the size of the sigmoid scores' differences)."""
        rng = np.random.default_rng(seed)
        d, e, f = config.d_model, config.num_experts, config.d_ff

        def gauss(shape, fan_in):
            return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(dtype)

        fan_in = {"router_bias": 100, "selection_bias": 10_000, "b1": 100, "b2": 100,
                  "shared_w1": d, "shared_w2": config.shared_d_ff, "shared_gate": d}
        router, w1, w2 = gauss((d, e), d), gauss((e, d, config.expert_n), d), gauss((e, f, d), f)
        optional = {name: gauss(shape, fan_in[name]) for name, shape in optional_weight_shapes(config).items()}
        return cls(router, w1, w2, **optional)

    @property
    def nbytes(self) -> int:
        arrays = [self.router, self.w1, self.w2, *(getattr(self, n) for n in OPTIONAL_WEIGHTS)]
        return sum(a.nbytes for a in arrays if a is not None)


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
