"""MoE layer configuration, the expert shape every model description shares, and the
benchmark presets (see docs/DESIGN.md, "Presets")."""

from __future__ import annotations

import math
from dataclasses import dataclass

# The expert activations a model may use; pymoe.ops.EXPERT_ACTIVATIONS is the wider set
# the expert-matmul op takes (its building blocks, "none" and "silu", too).
ACTIVATIONS = ("relu", "swiglu")


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int:
    """Slots each expert keeps: ceil(capacity_factor * tokens * top_k / num_experts),
    with the factor taken in per mille as the kernels take it; all slots for None."""
    slots = tokens * top_k
    if capacity_factor is None:
        return slots
    permille = int(round(capacity_factor * 1000))
    return -(-permille * slots // (1000 * num_experts))


@dataclass(frozen=True)
class ExpertShape:
    """One expert FFN's shape, the part every model description shares (MoEConfig here,
    OffloadModel for the offloading simulator, LMConfig for the trained LM).

    d_model: hidden size of the tokens. d_ff: hidden size of the FFN.
    activation: "relu" (relu(x W1) W2) or "swiglu" ((silu(x Wg) * (x Wu)) Wd), whose
        first weight holds [W_gate | W_up] side by side (pymoe/weights.py).
    """

    d_model: int
    d_ff: int
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def w1_cols(self) -> int:
        """Columns of the first weight w1: d_ff, or 2*d_ff for SwiGLU's [W_gate | W_up]."""
        return 2 * self.d_ff if self.activation == "swiglu" else self.d_ff

    @property
    def params(self) -> int:
        """Weights of one expert: w1 [d_model, w1_cols] and w2 [d_ff, d_model]."""
        return self.d_model * (self.w1_cols + self.d_ff)

    def nbytes(self, itemsize: int) -> int:
        """Bytes of one expert's weights at `itemsize` bytes per element."""
        return itemsize * self.params


@dataclass(frozen=True)
class MoEConfig:
    """Shape and routing rules of one MoE layer (each expert's FFN: `expert`).

    d_model: hidden size of the tokens.
    d_ff: hidden size of each expert's FFN.
    num_experts: E.
    top_k: experts per token, 1 <= top_k <= num_experts.
    activation: "relu" (Switch: relu(x W1) W2) or "swiglu" (Mixtral, Qwen:
        (silu(x Wg) * (x Wu)) Wd).
    renormalize: divide the k routing weights by their sum (Mixtral/Qwen);
        False keeps the softmax probabilities (Switch).
    capacity_factor: None for no limit; otherwise each expert keeps at most
        ceil(capacity_factor * tokens * top_k / num_experts) slots, the first in
        token order, and drops the rest. Given to 3 decimals (the kernels take it
        in per mille).
    """

    d_model: int
    d_ff: int
    num_experts: int = 8
    top_k: int = 2
    activation: str = "relu"
    renormalize: bool = True
    capacity_factor: float | None = None

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"MoEConfig.{name} must be an int, got {value!r}")
        if self.d_model < 1:
            raise ValueError(f"MoEConfig.d_model must be >= 1, got {self.d_model}")
        if self.d_ff < 1:
            raise ValueError(f"MoEConfig.d_ff must be >= 1, got {self.d_ff}")
        if self.num_experts < 1:
            raise ValueError(f"MoEConfig.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"MoEConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}"
            )
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"MoEConfig.renormalize must be a bool, got {self.renormalize!r}")
        if self.capacity_factor is not None:
            cf = self.capacity_factor
            if not isinstance(cf, (int, float)) or not math.isfinite(cf) or not 0.001 <= cf <= 1000:
                raise ValueError(
                    f"MoEConfig.capacity_factor must be None or a number in [0.001, 1000], got {cf!r}"
                )
            if abs(cf * 1000 - round(cf * 1000)) > 1e-9:
                raise ValueError(
                    f"MoEConfig.capacity_factor must have at most 3 decimals, got {cf!r}"
                )

    @property
    def capacity_factor_permille(self) -> int:
        """The capacity factor as the kernels take it: 1000 * factor, 0 for no limit."""
        return 0 if self.capacity_factor is None else int(round(self.capacity_factor * 1000))

    def capacity(self, tokens: int) -> int:
        """Slots each expert keeps for a batch of `tokens` tokens."""
        return expert_capacity(tokens, self.top_k, self.num_experts, self.capacity_factor)

    @property
    def expert(self) -> ExpertShape:
        """The shape of each expert's FFN."""
        return ExpertShape(self.d_model, self.d_ff, self.activation)

    @property
    def expert_n(self) -> int:
        """Columns of the first expert weight (expert.w1_cols): d_ff, or 2*d_ff for [W_gate | W_up]."""
        return self.expert.w1_cols

    @property
    def d_ff_dense(self) -> int:
        """Hidden size of the dense FFN with the same parameter count as all experts."""
        return self.num_experts * self.d_ff

    @property
    def dense_shape(self) -> ExpertShape:
        """The dense baseline's FFN: one expert d_ff_dense wide, as many weights as all experts."""
        return ExpertShape(self.d_model, self.d_ff_dense, self.activation)

    def active_flops(self, tokens: int) -> int:
        """FLOPs of the experts a batch actually runs (2 per multiply-add)."""
        return 2 * tokens * self.top_k * self.expert.params

    def expert_bytes(self, itemsize: int) -> int:
        """Bytes of one expert's weights."""
        return self.expert.nbytes(itemsize)


@dataclass(frozen=True)
class Preset:
    """A benchmark configuration: a layer shape plus a token count."""

    name: str
    config: MoEConfig
    tokens: int
    description: str


def _presets() -> dict[str, Preset]:
    shapes = {
        "small": (32, 512, 1024),
        "medium": (64, 1024, 2048),
        "large": (128, 2048, 4096),
    }
    presets = {}
    for name, (batch, seq, d_model) in shapes.items():
        config = MoEConfig(d_model=d_model, d_ff=4 * d_model, num_experts=8, top_k=2)
        presets[name] = Preset(
            name, config, batch * seq, f"prefill: {batch}x{seq} tokens, d_model {d_model}"
        )
        presets[f"{name}-decode"] = Preset(
            f"{name}-decode", config, batch, f"decode: {batch} sequences x 1 token, d_model {d_model}"
        )
    return presets


PRESETS: dict[str, Preset] = _presets()


def get_preset(name: str) -> Preset:
    """The preset called `name`; a ValueError lists the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
