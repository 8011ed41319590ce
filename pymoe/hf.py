"""Build MoELayer configs and weights from Hugging Face transformers' sparse-MoE modules.

Supported (transformers 5.x module layouts):
  MixtralSparseMoeBlock        swiglu experts, top-k, renormalized
  Qwen2MoeSparseMoeBlock       swiglu experts, top-k, renormalized iff norm_topk_prob;
                               its shared expert (a gated dense MLP added to the
                               output) is not part of MoELayer: add
                               `shared_expert_output(block, x)` to the layer's output
  SwitchTransformersSparseMLP  relu experts, top-1, Switch weights (not renormalized),
                               expert_capacity per sequence: equal to our capacity
                               for one sequence when capacity_factor is set by
                               `switch_capacity_factor`

    config, weights = from_hf(block)
    layer = MoELayer(config, weights)
"""

from __future__ import annotations

import numpy as np

from .config import MoEConfig
from .weights import MoEWeights


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def from_hf(block, capacity_factor: float | None = None) -> tuple[MoEConfig, MoEWeights]:
    """(MoEConfig, MoEWeights) equivalent to a transformers sparse-MoE module."""
    kind = type(block).__name__
    if kind in ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock"):
        experts, router = block.experts, block.gate
        num_experts, d_model = router.weight.shape
        d_ff = experts.down_proj.shape[2]
        renormalize = kind == "MixtralSparseMoeBlock" or bool(router.norm_topk_prob)
        act = getattr(experts.act_fn, "__class__", type(None)).__name__
        if act not in ("SiLU", "SiLUActivation"):
            raise ValueError(f"{kind}: only silu experts map to swiglu, got {act}")
        config = MoEConfig(
            d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=router.top_k,
            activation="swiglu", renormalize=renormalize, capacity_factor=capacity_factor,
        )
        weights = MoEWeights(
            router=_np(router.weight).T.copy(),
            # gate_up_proj is [E, 2F, d] with the gate rows first: transposed it is
            # [E, d, 2F] = [W_gate | W_up], our layout.
            w1=np.ascontiguousarray(_np(experts.gate_up_proj).transpose(0, 2, 1)),
            w2=np.ascontiguousarray(_np(experts.down_proj).transpose(0, 2, 1)),
        )
    elif kind == "SwitchTransformersSparseMLP":
        router = block.router
        if router.classifier.bias is not None:
            raise ValueError("SwitchTransformersSparseMLP with router_bias=True is not supported")
        experts = [block.experts[f"expert_{i}"] for i in range(router.num_experts)]
        act = type(experts[0].act).__name__
        if act != "ReLU":
            raise ValueError(f"SwitchTransformersSparseMLP: only relu experts are supported, got {act}")
        d_ff, d_model = experts[0].wi.weight.shape
        config = MoEConfig(
            d_model=d_model, d_ff=d_ff, num_experts=router.num_experts, top_k=1,
            activation="relu", renormalize=False, capacity_factor=capacity_factor,
        )
        weights = MoEWeights(
            router=_np(router.classifier.weight).T.copy(),
            w1=np.stack([_np(e.wi.weight).T for e in experts]),
            w2=np.stack([_np(e.wo.weight).T for e in experts]),
        )
    else:
        raise TypeError(
            f"unsupported module {kind}; expected MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock "
            "or SwitchTransformersSparseMLP"
        )
    weights.validate(config)
    return config, weights


def switch_capacity_factor(block, seq_len: int) -> float:
    """The capacity_factor for which our per-batch capacity equals the module's
    expert_capacity on one sequence of `seq_len` tokens."""
    return round(block.router.expert_capacity * block.router.num_experts / seq_len, 3)


def shared_expert_output(block, x):
    """Qwen2-MoE's gated shared-expert branch, which the module adds to the routed output."""
    import torch

    with torch.no_grad():
        return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
