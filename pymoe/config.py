"""MoE layer configuration, the expert shape every model description shares, and the
benchmark presets (see docs/DESIGN.md, "Presets")."""

from __future__ import annotations

import math
from dataclasses import dataclass

# The expert activations a model may use; pymoe.ops.EXPERT_ACTIVATIONS is the wider set
# the expert-matmul op takes (its building blocks, "none" and "silu", too).
#   relu:           relu(x W1) W2 (Switch)
#   swiglu:         (silu(x Wg) * (x Wu)) Wd (Mixtral, Qwen, DeepSeek, Llama-4)
#   clamped_swiglu: GPT-OSS's: g = min(x Wg, limit), u = clip(x Wu, -limit, limit),
#                   ((u + 1) * g * sigmoid(alpha * g)) Wd
ACTIVATIONS = ("relu", "swiglu", "clamped_swiglu")
# Activations whose first weight holds [W_gate | W_up] side by side (2*d_ff columns).
GATED_ACTIVATIONS = ("swiglu", "clamped_swiglu")
# How router logits become per-expert scores: softmax over the experts (Mixtral, Qwen,
# GPT-OSS) or an independent sigmoid per expert (DeepSeek-V3, GLM-4.5, Llama-4).
SCORINGS = ("softmax", "sigmoid")


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
    activation: one of ACTIVATIONS; the gated ones (GATED_ACTIVATIONS) hold
        [W_gate | W_up] side by side in their first weight (pymoe/weights.py).
    """

    d_model: int
    d_ff: int
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def w1_cols(self) -> int:
        """Columns of the first weight w1: d_ff, or 2*d_ff for a gated activation's [W_gate | W_up]."""
        return 2 * self.d_ff if self.activation in GATED_ACTIVATIONS else self.d_ff

    @property
    def params(self) -> int:
        """Weights of one expert: w1 [d_model, w1_cols] and w2 [d_ff, d_model]."""
        return self.d_model * (self.w1_cols + self.d_ff)

    def nbytes(self, itemsize: int) -> int:
        """Bytes of one expert's weights at `itemsize` bytes per element."""
        return itemsize * self.params


@dataclass(frozen=True)
class MoEConfig:
    """Shape and rules of one MoE layer: its router, its experts (each expert's FFN:
    `expert`) and its shared expert. docs/DESIGN.md ("Semantics") defines each rule;
    pymoe.routing.route is the routing rule in code.

    Shape:
      d_model: hidden size of the tokens.
      d_ff: hidden size of each routed expert's FFN.
      num_experts: E.
      top_k: experts per token, 1 <= top_k <= num_experts.
      activation: one of ACTIVATIONS: "relu" (Switch), "swiglu" (Mixtral, Qwen,
          DeepSeek, Llama-4) or "clamped_swiglu" (GPT-OSS, with swiglu_alpha and
          swiglu_limit).

    Router (logits = x @ router [+ router_bias]):
      scoring: "softmax" over the experts, or "sigmoid" per expert.
      router_bias: the router has a bias added to its logits (GPT-OSS).
      selection_bias: a per-expert bias added to the scores for choosing the experts
          only, never to their weights (DeepSeek-V3's e_score_correction_bias).
      n_group, topk_group: group-limited top-k (DeepSeek-V3): the E experts form
          n_group equal groups, a group's score is the sum of its two best selection
          scores, and the top_k experts are chosen among the topk_group best groups.
          n_group=1 (default) is plain top-k.
      renormalize: divide the k weights by their sum (Mixtral, Qwen3, DeepSeek-V3);
          False keeps the scores (Switch, Llama-4).
      routed_scaling_factor: multiplies the k weights after renormalization
          (DeepSeek-V3: 2.5).
      weight_on_input: scale each expert's *input* by its routing weight and add the
          expert outputs unweighted (Llama-4); top_k must be 1.

    Experts:
      expert_bias: both expert projections have a bias (GPT-OSS): b1 [E, w1 cols],
          b2 [E, d_model].
      swiglu_alpha, swiglu_limit: the clamped_swiglu constants (GPT-OSS: 1.702, 7.0).
      capacity_factor: None for no limit; otherwise each expert keeps at most
          ceil(capacity_factor * tokens * top_k / num_experts) slots, the first in
          token order, and drops the rest. Given to 3 decimals (the kernels take it
          in per mille).

    Shared expert (computed inside the layer, added to the routed output):
      shared_d_ff: hidden size of the shared SwiGLU expert; 0 for none. Models with
          several shared experts (DeepSeek's n_shared_experts) run them as one of
          n_shared * moe_intermediate_size, as transformers does.
      shared_gate: the shared expert's output is scaled by sigmoid(x @ w_gate), a
          [d_model, 1] weight (Qwen2-MoE); False adds it ungated (DeepSeek-V3, Llama-4).
    """

    d_model: int
    d_ff: int
    num_experts: int = 8
    top_k: int = 2
    activation: str = "relu"
    renormalize: bool = True
    capacity_factor: float | None = None
    scoring: str = "softmax"
    router_bias: bool = False
    selection_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    weight_on_input: bool = False
    expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    shared_d_ff: int = 0
    shared_gate: bool = False

    def __post_init__(self) -> None:
        def fail(message: str):
            raise ValueError(f"MoEConfig.{message}")

        for name in ("d_model", "d_ff", "num_experts", "top_k", "n_group", "topk_group", "shared_d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(f"{name} must be an int, got {value!r}")
        for name in ("renormalize", "router_bias", "selection_bias", "weight_on_input", "expert_bias",
                     "shared_gate"):
            if not isinstance(getattr(self, name), bool):
                fail(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("routed_scaling_factor", "swiglu_alpha", "swiglu_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(f"{name} must be a finite number, got {value!r}")
        if self.d_model < 1:
            fail(f"d_model must be >= 1, got {self.d_model}")
        if self.d_ff < 1:
            fail(f"d_ff must be >= 1, got {self.d_ff}")
        if self.num_experts < 1:
            fail(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            fail(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.activation not in ACTIVATIONS:
            fail(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.scoring not in SCORINGS:
            fail(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            fail(f"n_group must be >= 1 and divide num_experts={self.num_experts}, got {self.n_group}")
        if self.n_group > 1 and self.num_experts // self.n_group < 2:
            fail(f"group-limited top-k scores a group by its two best experts: num_experts / n_group "
                 f"must be >= 2, got {self.num_experts} / {self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            fail(f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
        if self.n_group == 1 and self.topk_group != 1:
            fail(f"topk_group applies only with n_group > 1, got topk_group={self.topk_group}")
        if self.top_k > self.topk_group * (self.num_experts // self.n_group):
            fail(f"top_k={self.top_k} is more than the {self.topk_group} kept groups of "
                 f"{self.num_experts // self.n_group} experts hold")
        if self.routed_scaling_factor <= 0:
            fail(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if self.weight_on_input and self.top_k != 1:
            fail(f"weight_on_input (Llama-4's input scaling) needs top_k=1, got top_k={self.top_k}")
        if self.swiglu_limit <= 0:
            fail(f"swiglu_limit must be > 0, got {self.swiglu_limit}")
        if self.swiglu_alpha <= 0:
            fail(f"swiglu_alpha must be > 0, got {self.swiglu_alpha}")
        if self.shared_d_ff < 0:
            fail(f"shared_d_ff must be >= 0 (0: no shared expert), got {self.shared_d_ff}")
        if self.shared_gate and self.shared_d_ff == 0:
            fail("shared_gate needs a shared expert (shared_d_ff > 0)")
        if self.capacity_factor is not None:
            cf = self.capacity_factor
            if not isinstance(cf, (int, float)) or not math.isfinite(cf) or not 0.001 <= cf <= 1000:
                fail(f"capacity_factor must be None or a number in [0.001, 1000], got {cf!r}")
            if abs(cf * 1000 - round(cf * 1000)) > 1e-9:
                fail(f"capacity_factor must have at most 3 decimals, got {cf!r}")

    @property
    def routing_rule(self) -> dict:
        """The keyword arguments of pymoe.routing.route (and route_torch) for this router,
        besides the logits and the selection bias."""
        return {
            "top_k": self.top_k, "renormalize": self.renormalize, "scoring": self.scoring,
            "n_group": self.n_group, "topk_group": self.topk_group,
            "scaling": float(self.routed_scaling_factor),
        }

    @property
    def shared_expert(self) -> ExpertShape | None:
        """The shared expert's shape (SwiGLU), or None when the layer has none."""
        return ExpertShape(self.d_model, self.shared_d_ff, "swiglu") if self.shared_d_ff else None

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
        """FLOPs of the experts a batch actually runs, the shared expert's included
        (2 per multiply-add; the router's and the biases' are left out)."""
        shared = self.shared_expert.params if self.shared_d_ff else 0
        return 2 * tokens * (self.top_k * self.expert.params + shared)

    def expert_bytes(self, itemsize: int) -> int:
        """Bytes of one expert's weights."""
        return self.expert.nbytes(itemsize)


@dataclass(frozen=True)
class Preset:
    """A benchmark layer: its shape and rules (`config`), the token counts `pymoe bench`
    runs it at unless told otherwise (`tokens`, one or more), and what it is."""

    name: str
    config: MoEConfig
    tokens: tuple[int, ...]
    description: str

    def __post_init__(self) -> None:
        if not self.tokens or not all(isinstance(t, int) and t >= 1 for t in self.tokens):
            raise ValueError(f"Preset {self.name}: tokens must be one or more ints >= 1, got {self.tokens!r}")


# Decode batches (one new token per sequence) and prefill chunks that the presets of real
# layers run at; docs/DESIGN.md ("Presets").
MODEL_TOKENS = (1, 16, 128, 4096, 16384)

# The MoE layer of each model, routed experts plus the shared expert where it has one
# (values from the models' transformers configs).
_SWIGLU = {"activation": "swiglu", "scoring": "softmax", "renormalize": True}
_GPT_OSS = {"activation": "clamped_swiglu", "scoring": "softmax", "renormalize": True, "router_bias": True,
            "expert_bias": True, "swiglu_alpha": 1.702, "swiglu_limit": 7.0}
MODEL_LAYERS = {
    "mixtral-8x7b": (MoEConfig(4096, 14336, 8, 2, **_SWIGLU), "Mixtral-8x7B: 8 experts, top-2, softmax, renormalized"),
    "qwen3-30b-a3b": (MoEConfig(2048, 768, 128, 8, **_SWIGLU),
                      "Qwen3-30B-A3B: 128 small experts, top-8, softmax, renormalized"),
    "qwen3-235b-a22b": (MoEConfig(4096, 1536, 128, 8, **_SWIGLU),
                        "Qwen3-235B-A22B: 128 experts, top-8, softmax, renormalized"),
    "gpt-oss-20b": (MoEConfig(2880, 2880, 32, 4, **_GPT_OSS),
                    "GPT-OSS-20B: 32 experts, top-4, router bias, expert biases, clamped SwiGLU"),
    "gpt-oss-120b": (MoEConfig(2880, 2880, 128, 4, **_GPT_OSS),
                     "GPT-OSS-120B: 128 experts, top-4, router bias, expert biases, clamped SwiGLU"),
    "deepseek-v3": (MoEConfig(7168, 2048, 256, 8, activation="swiglu", scoring="sigmoid", selection_bias=True,
                              n_group=8, topk_group=4, routed_scaling_factor=2.5, renormalize=True,
                              shared_d_ff=2048),
                    "DeepSeek-V3: 256 experts, top-8 of 4 of 8 groups, sigmoid, selection bias, scaling 2.5, "
                    "1 shared expert"),
}


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
            name, config, (batch * seq,), f"prefill: {batch}x{seq} tokens, d_model {d_model}"
        )
        presets[f"{name}-decode"] = Preset(
            f"{name}-decode", config, (batch,), f"decode: {batch} sequences x 1 token, d_model {d_model}"
        )
    for name, (config, description) in MODEL_LAYERS.items():
        presets[name] = Preset(name, config, MODEL_TOKENS, description)
    return presets


PRESETS: dict[str, Preset] = _presets()


def get_preset(name: str) -> Preset:
    """The preset called `name`; a ValueError lists the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
