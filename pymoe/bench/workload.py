"""What one benchmark cell runs on: the layer's random weights (made once per preset), the
tokens, whether they fit the machine, and the float64 reference they are checked against.

Weights are made where they will be used. On the CPU they are NumPy float32 arrays
(bf16-representable for a bfloat16 run, so that the reference sees exactly what the kernels
see), the form MoELayer takes. On the GPU they are torch tensors made on the device in the
run's dtype by a seeded generator: no float32 host copy of everything (DeepSeek-V3's 11.3 G
parameters would need 45 GB of it) and seconds instead of minutes to make them. Every
implementation then shares that one copy (PyTorch uses the tensors as they are, MAX's buffers
alias contiguous CUDA tensors of the layer's dtype).

The reference check converts to float64 only the experts the checked tokens use, one at a
time: pymoe.reference.moe_layer would convert every expert (90 GB for DeepSeek-V3).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from types import SimpleNamespace

import numpy as np
import torch

from .. import reference as R
from ..config import MoEConfig, Preset, get_preset
from ..dtypes import itemsize, torch_dtype
from ..routing import route
from ..weights import DenseWeights, MoEWeights, optional_weight_shapes

GIB = 2**30
# Share of the machine's memory the benchmark plans to use: the rest is the OS's, MAX's and
# PyTorch's own, the tokens and the intermediates.
MEMORY_SHARE = 0.85
# Standard deviation of each optional weight (those of MoEWeights.random).
OPTIONAL_STD = {"router_bias": 0.1, "selection_bias": 0.01, "b1": 0.1, "b2": 0.1}


# -- memory ---------------------------------------------------------------------

def host_memory_bytes() -> int:
    """This machine's RAM (MemTotal in /proc/meminfo; sysconf where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gpu_memory_bytes() -> int:
    """The first GPU's memory, as PyTorch sees it."""
    return torch.cuda.mem_get_info()[1]


def moe_params(config: MoEConfig) -> int:
    """Every weight of the layer: router, experts, optional weights (pymoe/weights.py)."""
    optional = sum(math.prod(shape) for shape in optional_weight_shapes(config).values())
    return config.d_model * config.num_experts + config.num_experts * config.expert.params + optional


@dataclass(frozen=True)
class MemoryPlan:
    """Whether a preset's weights fit the machine, and whether the dense baseline's do too.

    On the CPU the peak is the float32 host copy plus, while an implementation runs, its own
    copy in the run's dtype and, for bfloat16, one conversion in flight. On the GPU the one
    device copy is shared by every implementation."""

    device: str
    dtype: str
    moe_bytes: int  # the layer's weights in the run's dtype
    need_bytes: int  # the peak the plan counts on
    dense_need_bytes: int  # what the dense baseline's weights add to it
    have_bytes: int  # the machine's memory (host RAM on CPU, GPU memory on GPU)

    @property
    def budget(self) -> float:
        return MEMORY_SHARE * self.have_bytes

    @property
    def fits(self) -> bool:
        return self.need_bytes <= self.budget

    @property
    def dense_fits(self) -> bool:
        return self.need_bytes + self.dense_need_bytes <= self.budget

    def describe(self) -> str:
        where = "host RAM" if self.device == "cpu" else "GPU memory"
        return (f"{self.moe_bytes / GIB:.1f} GiB of weights in {self.dtype}; the run needs about "
                f"{self.need_bytes / GIB:.1f} GiB of the {self.have_bytes / GIB:.1f} GiB {where} "
                f"({MEMORY_SHARE:.0%} usable)")


def memory_plan(config: MoEConfig, device: str, dtype: str) -> MemoryPlan:
    """How much memory the benchmark of `config` needs on `device` (see MemoryPlan)."""
    size = itemsize(dtype)
    moe, dense = moe_params(config), config.dense_shape.params
    if device == "cpu":
        # The float32 host copy, one implementation's copy (pymoe's packed experts), and for a
        # narrower dtype one conversion in flight (float32 tensors share the host copy).
        per_param = 4 + size + (size if dtype != "float32" else 0)
        return MemoryPlan(device, dtype, moe * size, moe * per_param, dense * per_param, host_memory_bytes())
    return MemoryPlan(device, dtype, moe * size, moe * size, dense * size, gpu_memory_bytes())


def check_memory(preset: Preset, device: str, dtype: str) -> MemoryPlan:
    """The preset's memory plan; a ValueError that says why, before anything is allocated,
    when its weights do not fit."""
    plan = memory_plan(preset.config, device, dtype)
    if not plan.fits:
        hint = " Run it on a GPU (--device gpu) or a machine with more memory." if device == "cpu" else ""
        raise ValueError(f"preset {preset.name} does not fit this machine: {plan.describe()}.{hint}")
    return plan


# -- weights ----------------------------------------------------------------------

class DeviceMoEWeights(MoEWeights):
    """MoEWeights whose arrays are torch tensors (on the GPU, in the layer's dtype).

    MoEWeights.validate takes NumPy arrays only; this one checks the tensors' shapes and
    values the same way, so MoELayer (whose runtime.to_device_buffer takes tensors) can
    run on them without a host copy."""

    def validate(self, config: MoEConfig) -> None:
        wanted = {"router": (config.d_model, config.num_experts),
                  "w1": (config.num_experts, config.d_model, config.expert_n),
                  "w2": (config.num_experts, config.d_ff, config.d_model), **optional_weight_shapes(config)}
        for f in fields(self):
            value = getattr(self, f.name)
            if (value is None) != (f.name not in wanted):
                raise ValueError(f"weights.{f.name}: {'missing' if value is None else 'not used by the config'}")
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"weights.{f.name} must be a floating-point torch tensor")
            if tuple(value.shape) != wanted[f.name]:
                raise ValueError(f"weights.{f.name} has shape {tuple(value.shape)}, expected {wanted[f.name]}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"weights.{f.name} contains NaN or infinite values")


class DeviceDenseWeights(DenseWeights):
    """DenseWeights of torch tensors, checked as DeviceMoEWeights checks its own."""

    def validate(self, config: MoEConfig) -> None:
        wanted = {"w1": (config.d_model, config.dense_shape.w1_cols), "w2": (config.d_ff_dense, config.d_model)}
        for name, shape in wanted.items():
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                raise ValueError(f"dense weights.{name} must be a torch tensor of shape {shape}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"dense weights.{name} contains NaN or infinite values")


# Values made per chunk: no float32 copy of a whole weight exists when the dtype is narrower.
CHUNK = 2**24


def _normal(shape, std: float, generator: torch.Generator, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian values with standard deviation `std`, made CHUNK at a time."""
    out = torch.empty(shape, device=device, dtype=dtype)
    for part in out.view(-1).split(CHUNK):
        part.copy_(torch.randn(part.shape, generator=generator, device=device) * std)
    return out


def random_weights(config: MoEConfig, device: str, dtype: str, seed: int = 0,
                   dense: bool = False) -> tuple[MoEWeights, DenseWeights | None]:
    """The layer's weights (std 1/sqrt(fan_in), biases as MoEWeights.random) and, with
    `dense`, the dense baseline's: NumPy float32 for "cpu" (rounded to bfloat16 values for a
    bfloat16 run), torch tensors of the dtype on the GPU for "gpu" (DeviceMoEWeights)."""
    tdev = "cuda" if device == "gpu" else "cpu"
    # On the CPU the values are made in float32 and rounded; on the GPU made in the dtype.
    make_dtype = torch_dtype(dtype) if device == "gpu" else torch.float32
    generator = torch.Generator(device=tdev).manual_seed(seed)
    d, f = config.d_model, config.d_ff

    def normal(shape, std):
        t = _normal(shape, std, generator, tdev, make_dtype)
        if device == "cpu":
            if dtype == "bfloat16":
                for part in t.view(-1).split(CHUNK):
                    part.copy_(part.to(torch.bfloat16))
            return t.numpy()
        return t

    std = {"shared_w1": d**-0.5, "shared_w2": config.shared_d_ff**-0.5 if config.shared_d_ff else 1.0,
           "shared_gate": d**-0.5, **OPTIONAL_STD}
    arrays = {"router": normal((d, config.num_experts), d**-0.5),
              "w1": normal((config.num_experts, d, config.expert_n), d**-0.5),
              "w2": normal((config.num_experts, f, d), f**-0.5)}
    arrays.update({name: normal(shape, std[name]) for name, shape in optional_weight_shapes(config).items()})
    moe = (MoEWeights if device == "cpu" else DeviceMoEWeights)(**arrays)
    dense_w = None
    if dense:
        dense_type = DenseWeights if device == "cpu" else DeviceDenseWeights
        dense_w = dense_type(normal((d, config.dense_shape.w1_cols), d**-0.5),
                             normal((config.d_ff_dense, d), config.d_ff_dense**-0.5))
    return moe, dense_w


def round_bf16(a: np.ndarray) -> np.ndarray:
    """A float32 array rounded to the nearest bfloat16 values (kept as float32)."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).to(torch.float32).numpy()


def random_tokens(tokens: int, d_model: int, dtype: str, seed: int = 0) -> np.ndarray:
    """Standard normal tokens [tokens, d_model], float32 (bfloat16 values for bfloat16)."""
    x = np.random.default_rng(seed).standard_normal((tokens, d_model), dtype=np.float32)
    return round_bf16(x) if dtype == "bfloat16" else x


@dataclass
class Workload:
    """One benchmark cell: a preset at a token count, on a device, in a dtype."""

    preset: Preset
    tokens: int
    device: str
    dtype: str
    x: np.ndarray  # [tokens, d_model] float32 (bf16-representable when dtype is bf16)
    moe_weights: MoEWeights
    dense_weights: DenseWeights | None  # None where the dense baseline does not fit (`dense_skipped`)
    dense_skipped: str | None = None  # why the dense rows do not run
    references: dict = field(default_factory=dict)  # kind -> float64 reference of the checked rows, made once

    @property
    def config(self) -> MoEConfig:
        return self.preset.config


def make_workload(preset_name: str, tokens: int | None, device: str, dtype: str, seed: int = 0,
                  weights: tuple[MoEWeights, DenseWeights | None] | None = None) -> Workload:
    """The cell of `preset_name` at `tokens` (None: the preset's first token count). `weights`
    (from random_weights) lets the cells of one preset share one set; without them they are
    made here, after the memory check."""
    preset = get_preset(preset_name)
    tokens = preset.tokens[0] if tokens is None else tokens
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    dense_skipped = None
    if weights is None:
        plan = check_memory(preset, device, dtype)
        weights = random_weights(preset.config, device, dtype, seed + 1, dense=plan.dense_fits)
    if weights[1] is None:
        dense_skipped = dense_skip_reason(preset.config, device, dtype)
    x = random_tokens(tokens, preset.config.d_model, dtype, seed)
    return Workload(preset, tokens, device, dtype, x, weights[0], weights[1], dense_skipped)


def dense_skip_reason(config: MoEConfig, device: str, dtype: str) -> str:
    plan = memory_plan(config, device, dtype)
    return (f"the dense FFN of the experts' size ({config.d_ff_dense} wide, "
            f"{config.dense_shape.nbytes(itemsize(dtype)) / GIB:.1f} GiB) does not fit beside the layer: "
            f"{(plan.need_bytes + plan.dense_need_bytes) / GIB:.1f} GiB needed, {plan.budget / GIB:.1f} GiB usable")


# -- the float64 reference -------------------------------------------------------------

def host64(a) -> np.ndarray | None:
    """A NumPy array or a torch tensor (on any device) as a float64 NumPy array."""
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def routing(x: np.ndarray, weights: MoEWeights, config: MoEConfig):
    """The float64 routing of the tokens x (pymoe.routing.route with the layer's rule)."""
    logits = x.astype(np.float64) @ host64(weights.router)
    if weights.router_bias is not None:
        logits = logits + host64(weights.router_bias)
    return route(logits, **config.routing_rule, selection_bias=host64(weights.selection_bias))


def reference_moe(x: np.ndarray, weights: MoEWeights, config: MoEConfig) -> np.ndarray:
    """pymoe.reference.moe_layer(x, weights, config).out, converting to float64 only the
    experts that x uses, one at a time (weights may be torch tensors on the GPU)."""
    if config.capacity_factor is not None:  # the reference's dispatch decides what is dropped
        arrays = {f.name: host64(getattr(weights, f.name)) for f in fields(weights)}
        return R.moe_layer(x, MoEWeights(**arrays), config).out
    gate = routing(x, weights, config)
    x64 = x.astype(np.float64)
    out = np.zeros_like(x64)
    for e in np.unique(gate.ids):
        token, slot = np.nonzero(gate.ids == e)  # a token picks an expert at most once
        w = gate.weights[token, slot][:, None]
        h = (x64[token] * w if config.weight_on_input else x64[token]) @ host64(weights.w1[e])
        if weights.b1 is not None:
            h = h + host64(weights.b1[e])
        y = R.expert_activation(h, config.activation, config.swiglu_alpha, config.swiglu_limit) @ host64(weights.w2[e])
        if weights.b2 is not None:
            y = y + host64(weights.b2[e])
        out[token] += y if config.weight_on_input else w * y
    if config.shared_d_ff:
        shared = SimpleNamespace(**{n: host64(getattr(weights, n)) for n in ("shared_w1", "shared_w2", "shared_gate")})
        out = out + R.shared_expert(x, shared)
    return out


def reference_dense(x: np.ndarray, weights: DenseWeights, activation: str, block: int = 4096) -> np.ndarray:
    """pymoe.reference.dense_ffn(x, weights, activation) on NumPy or torch weights, `block`
    hidden units at a time (the dense baseline of a large layer is tens of GB)."""
    x64 = x.astype(np.float64)
    hidden = weights.w2.shape[0]
    gated = weights.w1.shape[1] == 2 * hidden
    out = np.zeros_like(x64)
    for lo in range(0, hidden, block):
        hi = min(lo + block, hidden)
        cols = np.r_[lo:hi, hidden + lo:hidden + hi] if gated else np.r_[lo:hi]
        w1 = weights.w1[:, torch.from_numpy(cols)] if isinstance(weights.w1, torch.Tensor) else weights.w1[:, cols]
        out += R.expert_activation(x64 @ host64(w1), activation) @ host64(weights.w2[lo:hi])
    return out
