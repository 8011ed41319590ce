"""The PyTorch baselines (pymoe/baselines.py) against the float64 reference, for every router
and expert variant of MoEConfig, in both styles (CPU, float32)."""

import numpy as np
import pytest
import torch
from conftest import FP32_TOL, rel_err, routing_near_ties

from pymoe import reference as R
from pymoe.baselines import TorchDenseFFN, TorchMoE
from pymoe.config import MoEConfig
from pymoe.weights import DenseWeights, MoEWeights

# Variants by name: the rules of today's models on small sizes. The loop style runs them on
# odd widths; the grouped style on widths that are multiples of 4, the least
# torch._grouped_mm takes on CPU (16-byte strides).
VARIANTS = {
    "switch: relu, top-1, not renormalized": dict(num_experts=5, top_k=1, activation="relu", renormalize=False),
    "mixtral: swiglu, top-2, renormalized": dict(num_experts=8, top_k=2, activation="swiglu"),
    "k = E": dict(num_experts=4, top_k=4, activation="swiglu"),
    "gpt-oss: router bias, expert biases, clamped swiglu": dict(
        num_experts=6, top_k=3, activation="clamped_swiglu", router_bias=True, expert_bias=True,
        swiglu_alpha=1.5, swiglu_limit=0.8),
    "deepseek-v3: sigmoid, selection bias, groups, scaling, shared expert": dict(
        num_experts=16, top_k=4, activation="swiglu", scoring="sigmoid", selection_bias=True, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, shared_d_ff=9),
    "qwen2-moe: gated shared expert, not renormalized": dict(
        num_experts=6, top_k=2, activation="swiglu", renormalize=False, shared_d_ff=7, shared_gate=True),
    "llama-4: sigmoid top-1 on the input, shared expert": dict(
        num_experts=5, top_k=1, activation="swiglu", scoring="sigmoid", renormalize=False, weight_on_input=True,
        shared_d_ff=6),
}
WIDTHS = {"loop": (13, 11), "grouped": (12, 20)}


@pytest.mark.parametrize("style", ["loop", "grouped"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_torch_moe_matches_the_reference(variant, style, rng):
    d_model, d_ff = WIDTHS[style]
    config = MoEConfig(d_model=d_model, d_ff=d_ff, **VARIANTS[variant])
    weights = MoEWeights.random(config, seed=int(rng.integers(2**31)))
    for tokens in (1, 37):
        x = rng.standard_normal((tokens, d_model), dtype=np.float32)
        out = TorchMoE(config, weights, style=style)(torch.from_numpy(x)).numpy()
        ref = R.moe_layer(x, weights, config).out
        ok = ~routing_near_ties(x, weights, config)
        assert ok.sum() >= tokens // 2, "too few tokens without a near-tie to test"
        assert rel_err(out[ok], ref[ok]) < FP32_TOL, (variant, style, tokens)


def test_the_styles_agree_on_a_variant_that_changes_every_step(rng):
    config = MoEConfig(d_model=8, d_ff=12, num_experts=8, top_k=2, activation="clamped_swiglu", scoring="sigmoid",
                       router_bias=True, selection_bias=True, n_group=4, topk_group=2, expert_bias=True,
                       routed_scaling_factor=1.5, shared_d_ff=4, shared_gate=True)
    weights = MoEWeights.random(config, seed=1)
    x = torch.from_numpy(rng.standard_normal((29, 8), dtype=np.float32))
    loop, grouped = TorchMoE(config, weights, style="loop")(x), TorchMoE(config, weights, style="grouped")(x)
    assert rel_err(loop.numpy(), grouped.numpy()) < FP32_TOL
    # The variant's extras matter: without the shared expert the output differs.
    no_shared = TorchMoE(config, weights)
    no_shared.shared_w1 = None
    assert rel_err(no_shared(x).numpy(), loop.numpy()) > 1e-3


def test_torch_moe_takes_tensors_without_copying_them():
    config = MoEConfig(d_model=8, d_ff=4, num_experts=4, top_k=2, activation="swiglu")
    weights = MoEWeights.random(config, seed=0)
    tensors = MoEWeights(*(torch.from_numpy(a) for a in (weights.router, weights.w1, weights.w2)))
    moe = TorchMoE(config, tensors)
    assert moe.w1.data_ptr() == tensors.w1.data_ptr()
    x = np.ones((3, 8), dtype=np.float32)
    assert rel_err(moe(torch.from_numpy(x)).numpy(), R.moe_layer(x, weights, config).out) < FP32_TOL


@pytest.mark.parametrize("activation", ["relu", "swiglu", "clamped_swiglu"])
def test_dense_ffn_matches_the_reference(activation, rng):
    config = MoEConfig(d_model=9, d_ff=5, num_experts=3, top_k=1, activation=activation)
    weights = DenseWeights.random(config, seed=int(rng.integers(2**31)))
    x = 3 * rng.standard_normal((6, 9), dtype=np.float32)  # large enough that the clamp acts
    out = TorchDenseFFN(config, weights)(torch.from_numpy(x)).numpy()
    assert rel_err(out, R.dense_ffn(x, weights, activation)) < FP32_TOL


def test_bad_style_is_rejected():
    config = MoEConfig(d_model=4, d_ff=4)
    with pytest.raises(ValueError, match="style must be"):
        TorchMoE(config, MoEWeights.random(config), style="vllm")
