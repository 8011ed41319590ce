"""Model shapes the offloading simulator and engine use: E, k, layers and the bytes of one expert.

The presets copy the expert sizes of two real models: `switch` (Switch Transformer: 128 experts,
12 layers, top-1, 27 MiB per expert) and `qwen` (Qwen1.5-MoE: 64 experts, 28 layers,
top-8, 28.5 MB per expert). d_model / d_ff / dtype are chosen so that one expert's weights
are exactly that size; they set the compute cost the calibration measures. A third,
`qwen3-30b-a3b`, has the real model's own routing and expert shape (pymoe's preset of the
same name: 128 experts of 2048 x 768, SwiGLU, top-8, 48 layers, 9.4 MB per expert in
bfloat16): small experts, so a transfer and a host computation of one are both cheap, in a
different ratio to the GPU compute than the other two. No trace of the real model is
committed; `pymoe trace synthetic --model qwen3-30b-a3b` makes one."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ACTIVATIONS, ExpertShape
from ..dtypes import ITEMSIZE


@dataclass(frozen=True)
class OffloadModel:
    """The routing shape and expert size of one MoE model.

    num_experts: E per layer. num_layers: MoE layers. top_k: experts per token.
    d_model, d_ff, activation, dtype: one expert's FFN (relu: 2 matrices; swiglu: 3).
    """

    name: str
    num_experts: int
    num_layers: int
    top_k: int
    d_model: int
    d_ff: int
    activation: str = "relu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for field in ("num_experts", "num_layers", "top_k", "d_model", "d_ff"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"OffloadModel.{field} must be an int >= 1, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"OffloadModel.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"OffloadModel.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.dtype not in ITEMSIZE:
            raise ValueError(f"OffloadModel.dtype must be one of {sorted(ITEMSIZE)}, got {self.dtype!r}")

    @property
    def expert(self) -> ExpertShape:
        """The shape of each expert's FFN (expert.w1_cols: columns of its first matrix)."""
        return ExpertShape(self.d_model, self.d_ff, self.activation)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights in `dtype`."""
        return self.expert.nbytes(ITEMSIZE[self.dtype])

    @property
    def total_experts(self) -> int:
        return self.num_experts * self.num_layers

    def shape_key(self) -> str:
        """Names the expert FFN shape in calibration files."""
        return f"{self.d_model}x{self.d_ff}-{self.activation}-{self.dtype}"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "num_experts": self.num_experts,
            "num_layers": self.num_layers,
            "top_k": self.top_k,
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "activation": self.activation,
            "dtype": self.dtype,
            "expert_bytes": self.expert_bytes,
        }


MODELS = {
    # 2 * 768 * 4608 * 4 B = 27 MiB exactly.
    "switch": OffloadModel("switch", 128, 12, 1, d_model=768, d_ff=4608, activation="relu", dtype="float32"),
    # 3 * 2048 * 2320 * 2 B = 28.5 MB.
    "qwen": OffloadModel("qwen", 64, 28, 8, d_model=2048, d_ff=2320, activation="swiglu", dtype="bfloat16"),
    # Qwen3-30B-A3B (config.json: hidden_size 2048, moe_intermediate_size 768, 128 experts,
    # 8 per token, 48 layers): 3 * 2048 * 768 * 2 B = 9.4 MB.
    "qwen3-30b-a3b": OffloadModel("qwen3-30b-a3b", 128, 48, 8, d_model=2048, d_ff=768, activation="swiglu",
                                  dtype="bfloat16"),
}


def get_model(name: str) -> OffloadModel:
    """A preset by name, or a shape `E:layers:k:d_model:d_ff[:activation[:dtype]]`,
    e.g. `32:16:2:1024:4096:swiglu:bfloat16`."""
    if name in MODELS:
        return MODELS[name]
    parts = name.split(":")
    if len(parts) < 5 or len(parts) > 7:
        raise ValueError(
            f"unknown model {name!r}: use a preset {sorted(MODELS)} or "
            "E:layers:k:d_model:d_ff[:activation[:dtype]], e.g. 32:16:2:1024:4096:swiglu:bfloat16"
        )
    try:
        e, layers, k, d_model, d_ff = (int(p) for p in parts[:5])
    except ValueError:
        raise ValueError(f"model shape {name!r}: the first five fields must be integers") from None
    return OffloadModel(name, e, layers, k, d_model, d_ff, *parts[5:])
