"""pymoe for Hugging Face transformers (5.x) MoE models: `from_hf` turns a sparse-MoE block
into an equivalent (MoEConfig, MoEWeights); `patch` swaps every such block of a loaded
model for one that runs a pymoe MoELayer, so that `model.generate()` runs on pymoe.

Supported blocks (the class name of the module, as transformers 5.x lays it out):

  MixtralSparseMoeBlock        softmax top-k, renormalized; SwiGLU experts
  Qwen2MoeSparseMoeBlock       softmax top-k, renormalized iff norm_topk_prob; plus its
                               sigmoid-gated shared expert (shared_d_ff, shared_gate)
  Qwen3MoeSparseMoeBlock       softmax top-k, renormalized iff norm_topk_prob
  OlmoeSparseMoeBlock          softmax top-k, renormalized iff norm_topk_prob
  DeepseekV3MoE                sigmoid scores, e_score_correction_bias as the selection
  Glm4MoeMoE                   bias, group-limited top-k (n_group, topk_group), renormalized
                               iff norm_topk_prob, routed_scaling_factor; an ungated shared
                               expert of n_shared_experts * moe_intermediate_size
  GptOssMLP                    router bias, softmax over the top-k logits (= renormalized
                               softmax), expert biases, clamped SwiGLU (alpha, limit)
  Llama4TextMoe                top-1 sigmoid router scaling the expert's input
                               (weight_on_input); an ungated shared expert
  SwitchTransformersSparseMLP  softmax top-1, not renormalized; relu experts; its
                               expert_capacity is per sequence: `switch_capacity_factor`
                               gives our (per batch) capacity_factor for one sequence

    config, weights = from_hf(block)
    layer = MoELayer(config, weights)

    patched = patch(model)     # number of blocks replaced
    model.generate(...)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .config import MoEConfig
from .weights import MoEWeights

SUPPORTED_BLOCKS = (
    "MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock",
    "DeepseekV3MoE", "Glm4MoeMoE", "GptOssMLP", "Llama4TextMoe", "SwitchTransformersSparseMLP",
)
_SILU = ("SiLU", "SiLUActivation")


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def _linear_t(linear, kind: str, what: str) -> np.ndarray:
    """An nn.Linear's weight [out, in] as our x @ W layout [in, out]; a bias is refused."""
    if linear.bias is not None:
        raise ValueError(f"{kind}: {what} has a bias, which pymoe does not support there")
    return np.ascontiguousarray(_np(linear.weight).T)


def _check_silu(kind: str, act, what: str) -> None:
    if type(act).__name__ not in _SILU:
        raise ValueError(f"{kind}: {what} use {type(act).__name__}; pymoe runs only silu-gated (SwiGLU) ones")


def _gate_up_columns(a: np.ndarray, concatenated: bool) -> np.ndarray:
    """[..., 2F] of gate and up columns as our [gate | up]: already so when `concatenated`,
    else interleaved (GPT-OSS: gate = [..., ::2], up = [..., 1::2])."""
    if concatenated:
        return np.ascontiguousarray(a)
    return np.concatenate([a[..., ::2], a[..., 1::2]], axis=-1)


def _expert_weights(kind: str, experts, transposed: bool = False) -> dict:
    """w1 [E, d, 2F] = [W_gate | W_up], w2 [E, F, d] and, when the experts have biases, b1 and b2,
    from a transformers 5.x experts module. Its gate_up_proj is [E, 2F, d] and down_proj
    [E, d, F] (nn.Linear's [out, in]), or [E, d, 2F] and [E, F, d] where the module says
    is_transposed; experts decorated by use_experts_implementation say their layout in
    is_transposed / is_concatenated / has_bias, the others (Llama-4) pass `transposed`."""
    if getattr(experts, "has_post_expert_norm", False) or not getattr(experts, "has_gate", True):
        raise ValueError(f"{kind}: experts with a post-expert norm or without a gate are not supported")
    transposed = getattr(experts, "is_transposed", transposed)
    concatenated = getattr(experts, "is_concatenated", True)
    gate_up, down = _np(experts.gate_up_proj), _np(experts.down_proj)
    if not transposed:
        gate_up, down = gate_up.transpose(0, 2, 1), down.transpose(0, 2, 1)
    out = {"w1": _gate_up_columns(gate_up, concatenated), "w2": np.ascontiguousarray(down)}
    if getattr(experts, "has_bias", False):
        out["b1"] = _gate_up_columns(_np(experts.gate_up_proj_bias), concatenated)
        out["b2"] = np.ascontiguousarray(_np(experts.down_proj_bias))
    return out


def _shared_expert(kind: str, mlp) -> dict:
    """A dense SwiGLU MLP (gate_proj, up_proj, down_proj) as shared_w1 [d, 2Fs], shared_w2 [Fs, d]."""
    _check_silu(kind, getattr(mlp, "act_fn", getattr(mlp, "activation_fn", None)), "its shared expert's activations")
    gate, up = _linear_t(mlp.gate_proj, kind, "gate_proj"), _linear_t(mlp.up_proj, kind, "up_proj")
    if gate.shape[1] == 0:
        return {}
    return {"shared_w1": np.concatenate([gate, up], axis=1),
            "shared_w2": _linear_t(mlp.down_proj, kind, "down_proj")}


def _layer(kind: str, router: np.ndarray, experts: dict, capacity_factor, **rule) -> tuple[MoEConfig, MoEWeights]:
    """(MoEConfig, MoEWeights) of a block: the shape from the weights, the router's rule
    from `rule` (MoEConfig fields and optional MoEWeights, told apart by name)."""
    weight_names = {f.name for f in dataclasses.fields(MoEWeights)}
    optional = {name: value for name, value in rule.items() if name in weight_names}
    fields = {name: value for name, value in rule.items() if name not in weight_names}
    num_experts, d_model, d_ff = experts["w2"].shape[0], experts["w2"].shape[2], experts["w2"].shape[1]
    if "shared_w2" in optional:
        fields["shared_d_ff"] = optional["shared_w2"].shape[0]
    fields.setdefault("shared_gate", "shared_gate" in optional)
    config = MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, capacity_factor=capacity_factor,
                       router_bias="router_bias" in optional, selection_bias="selection_bias" in optional,
                       expert_bias="b1" in experts, **fields)
    weights = MoEWeights(router=router, **experts, **optional)
    try:
        weights.validate(config)
    except ValueError as e:
        raise ValueError(f"{kind}: {e}") from None
    return config, weights


def _softmax_topk_block(block, capacity_factor):
    """Mixtral, Qwen2-MoE (with its gated shared expert), Qwen3-MoE, OLMoE."""
    kind, router = type(block).__name__, block.gate
    _check_silu(kind, block.experts.act_fn, "its experts")
    rule = {"top_k": router.top_k, "activation": "swiglu",
            "renormalize": kind == "MixtralSparseMoeBlock" or bool(router.norm_topk_prob)}
    if kind == "Qwen2MoeSparseMoeBlock":
        shared = _shared_expert(kind, block.shared_expert)
        if shared:
            rule.update(shared, shared_gate=_linear_t(block.shared_expert_gate, kind, "shared_expert_gate"))
    return _layer(kind, _np(router.weight).T.copy(), _expert_weights(kind, block.experts), capacity_factor, **rule)


def _deepseek_block(block, capacity_factor):
    """DeepSeek-V3 and GLM-4-MoE: sigmoid, selection bias, group-limited top-k, scaling."""
    kind, router = type(block).__name__, block.gate
    _check_silu(kind, block.experts.act_fn, "its experts")
    return _layer(
        kind, _np(router.weight).T.copy(), _expert_weights(kind, block.experts), capacity_factor,
        top_k=router.top_k, activation="swiglu", scoring="sigmoid", renormalize=bool(router.norm_topk_prob),
        selection_bias=_np(router.e_score_correction_bias), n_group=int(router.num_group),
        topk_group=int(router.topk_group), routed_scaling_factor=float(router.routed_scaling_factor),
        **_shared_expert(kind, block.shared_experts),
    )


def _gpt_oss_block(block, capacity_factor):
    """GPT-OSS: softmax over the top-k biased logits is the renormalized softmax of them all."""
    kind, router, experts = type(block).__name__, block.router, block.experts
    return _layer(
        kind, _np(router.weight).T.copy(), _expert_weights(kind, experts), capacity_factor,
        top_k=router.top_k, activation="clamped_swiglu", renormalize=True, router_bias=_np(router.bias),
        swiglu_alpha=float(experts.alpha), swiglu_limit=float(experts.limit),
    )


def _llama4_block(block, capacity_factor):
    """Llama-4: sigmoid of the top-1 logit scales the expert's input; an ungated shared expert."""
    kind, router = type(block).__name__, block.router
    if router.top_k != 1:
        raise ValueError(f"{kind}: num_experts_per_tok={router.top_k}; pymoe runs Llama-4's input-scaling "
                         "router with one expert per token only")
    _check_silu(kind, block.experts.act_fn, "its experts")
    return _layer(
        kind, _linear_t(router, kind, "the router"), _expert_weights(kind, block.experts, transposed=True),
        capacity_factor, top_k=1, activation="swiglu", scoring="sigmoid", renormalize=False,
        weight_on_input=True, **_shared_expert(kind, block.shared_expert),
    )


def _switch_block(block, capacity_factor):
    """SwitchTransformers: relu experts, top-1 by the softmax, weighted by its probability."""
    kind, router = type(block).__name__, block.router
    experts = [block.experts[f"expert_{i}"] for i in range(router.num_experts)]
    if type(experts[0].act).__name__ != "ReLU":
        raise ValueError(f"{kind}: only relu experts are supported, got {type(experts[0].act).__name__}")
    return _layer(
        kind, _linear_t(router.classifier, kind, "the router (router_bias=True)"),
        {"w1": np.stack([_linear_t(e.wi, kind, "wi") for e in experts]),
         "w2": np.stack([_linear_t(e.wo, kind, "wo") for e in experts])},
        capacity_factor, top_k=1, activation="relu", renormalize=False,
    )


_READERS = {
    "MixtralSparseMoeBlock": _softmax_topk_block, "Qwen2MoeSparseMoeBlock": _softmax_topk_block,
    "Qwen3MoeSparseMoeBlock": _softmax_topk_block, "OlmoeSparseMoeBlock": _softmax_topk_block,
    "DeepseekV3MoE": _deepseek_block, "Glm4MoeMoE": _deepseek_block, "GptOssMLP": _gpt_oss_block,
    "Llama4TextMoe": _llama4_block, "SwitchTransformersSparseMLP": _switch_block,
}
assert tuple(_READERS) == SUPPORTED_BLOCKS


def from_hf(block, capacity_factor: float | None = None) -> tuple[MoEConfig, MoEWeights]:
    """(MoEConfig, MoEWeights) computing what the transformers sparse-MoE module `block`
    computes (in eval mode: without Mixtral's router jitter), weights as float32 NumPy.

    capacity_factor: the MoEConfig's (None: no expert drops any token, as every module but
    Switch's). A block of another class raises a TypeError listing SUPPORTED_BLOCKS; a
    supported one with something pymoe does not run (another activation, a bias where
    pymoe has none, Llama-4 with top_k > 1) raises a ValueError saying what."""
    kind = type(block).__name__
    if kind not in _READERS:
        raise TypeError(f"unsupported module {kind}; from_hf takes one of {', '.join(SUPPORTED_BLOCKS)}")
    return _READERS[kind](block, capacity_factor)


def switch_capacity_factor(block, seq_len: int) -> float:
    """The capacity_factor for which our per-batch capacity equals the module's
    expert_capacity on one sequence of `seq_len` tokens."""
    return round(block.router.expert_capacity * block.router.num_experts / seq_len, 3)


# ------------------------------------------------------------------ patch


def _recording_router_logits() -> bool:
    """Whether the running transformers forward records router logits (output_router_logits):
    it does so with hooks on the router modules, which a patched block then has to call.
    The collector is transformers-internal; without it, assume it records."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return True
    collected = _active_collector.get()
    return collected is not None and "router_logits" in collected


class PymoeBlock(torch.nn.Module):
    """A transformers MoE block (one of SUPPORTED_BLOCKS) running on a pymoe MoELayer, for
    inference: no gradients flow through it.

    forward takes the block's input ([batch, seq, d]) and returns what the block returned:
    the output of the input's shape; GptOssMLP (output, router_scores [T, k]) and
    Llama4TextMoe (output [T, d], router_logits [T, E]), computed by the block's own router
    module (a [T, d] x [d, E] product; their decoder layers drop them, but callers of the
    block may not). The router module stays a submodule so that transformers' hooks
    recording router logits (output_router_logits) find it; it runs only when they record.
    On CUDA the block waits for PyTorch's stream before the MAX graph reads the input and
    for MAX before PyTorch reads the output (they run on separate streams)."""

    def __init__(self, block, device: str, dtype: str):
        from .layer import MoELayer
        from .runtime import driver_device

        super().__init__()
        self.kind = type(block).__name__
        self.config, weights = from_hf(block)
        self.device_name, self.dtype_name = device, dtype
        self.layer = MoELayer(self.config, weights, device=device, dtype=dtype)
        self.router = block.router if hasattr(block, "router") else block.gate
        self._accelerator = driver_device("gpu") if device == "gpu" else None
        # Switch drops tokens past expert_capacity per sequence: layers with that capacity
        # for a sequence length (built on first use), from the weights kept here.
        self._switch_weights = weights if self.kind == "SwitchTransformersSparseMLP" else None
        self._switch_layers = {}

    def extra_repr(self) -> str:
        c = self.config
        return (f"{self.kind} on pymoe: d_model={c.d_model}, d_ff={c.d_ff}, experts={c.num_experts}, "
                f"top_k={c.top_k}, device={self.device_name}, dtype={self.dtype_name}")

    def _run(self, layer, x):
        if x.is_cuda:
            torch.cuda.current_stream(x.device).synchronize()
        out = layer.forward_unchecked(x.contiguous())
        if self._accelerator is not None:
            self._accelerator.synchronize()
        return out

    def _switch_layer(self, seq_len: int):
        """The layer dropping past the router's expert_capacity in one sequence of seq_len tokens."""
        from .layer import MoELayer

        if seq_len not in self._switch_layers:
            capacity = self.router.expert_capacity
            config = dataclasses.replace(self.config, capacity_factor=round(
                capacity * self.config.num_experts / seq_len, 3))
            if config.capacity(seq_len) != capacity:
                raise NotImplementedError(
                    f"SwitchTransformersSparseMLP: no 3-decimal capacity_factor gives expert_capacity={capacity} "
                    f"for {seq_len} tokens with {self.config.num_experts} experts")
            self._switch_layers[seq_len] = MoELayer(config, self._switch_weights, self.device_name, self.dtype_name)
        return self._switch_layers[seq_len]

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self.kind == "SwitchTransformersSparseMLP" and shape[1] > self.router.expert_capacity:
            layer = self._switch_layer(shape[1])
            out = torch.cat([self._run(layer, sequence) for sequence in hidden_states])
        else:
            # (Switch with seq <= expert_capacity: top-1 cannot overfill an expert.)
            out = self._run(self.layer, x)
        if self.kind == "GptOssMLP":
            return out.reshape(shape), self.router(x)[1]
        if self.kind == "Llama4TextMoe":
            return out, self.router(x)[1]
        if _recording_router_logits():
            self.router(hidden_states if self.kind == "SwitchTransformersSparseMLP" else x)
        return out.reshape(shape)


def _layer_dtype(block) -> str:
    """The layer dtype of a block: its experts' weights' (the routers of DeepSeek-V3 and
    GLM stay float32 in bfloat16 models; the layer runs its router in the layer dtype)."""
    dtype = next(block.experts.parameters()).dtype
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
    if dtype not in names:
        raise ValueError(f"{type(block).__name__}: its experts are {dtype}; pymoe runs float32 or bfloat16")
    return names[dtype]


def patch(model, device: str | None = None) -> int:
    """Replace every supported MoE block (SUPPORTED_BLOCKS) of the transformers `model` by a
    PymoeBlock running pymoe's MoELayer; returns how many were replaced.

    device: "cpu" or "gpu"; None runs each block where its weights are (CUDA: "gpu", which
    is MAX's first GPU, so cuda:0). The layer's dtype is the experts' (float32 or bfloat16).
    The blocks' expert weights move into the layers (the originals are dropped); the
    router modules stay. For inference (generate, no_grad, inference_mode)."""
    targets = [(name, module) for name, module in model.named_modules() if type(module).__name__ in _READERS]
    if any(name == "" for name, _ in targets):
        raise ValueError("patch takes a model that contains MoE blocks, not a block itself")
    for name, block in targets:
        where = next(block.parameters()).device
        block_device = device or ("gpu" if where.type == "cuda" else "cpu")
        if block_device == "gpu" and device is None and (where.index or 0) != 0:
            raise ValueError(f"{name} is on {where}; pymoe's GPU layer runs on MAX's first GPU (cuda:0)")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, PymoeBlock(block, block_device, _layer_dtype(block)))
    return len(targets)
