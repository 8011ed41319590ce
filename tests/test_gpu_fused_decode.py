"""The fused decode kernel (kernels/moe_decode.mojo: a few tokens' expert GEMVs and combine in
one kernel, pymoe_moe_ffn_decode) inside MoELayer(fused_decode=True), bfloat16, against the
float64 reference: every activation, the expert biases, widths off its chunk sizes, experts
shared by several tokens (E = 8, top-2 at 4 tokens), E = 128 top-8, each batch size it takes
(1 to 4 tokens) and the first one it does not; that it leaves its counters at zero (the next call, the same again, is
bit-identical: its partials are summed in a fixed order) and that layers of a stack share its
scratch. Skipped where MAX sees no GPU (CI has none). On a GPU machine:
`pytest tests/test_gpu_fused_decode.py`.
"""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import BF16_TOL
from max.driver import accelerator_count
from model_layer_cases import check_layer

import pymoe.ops as mops
from pymoe import MoEConfig, MoELayer, MoEWeights
from pymoe.runtime import STACK_RMS_EPS

pytestmark = pytest.mark.skipif(accelerator_count() == 0, reason="MAX sees no GPU on this machine")

_GPT_OSS = {"activation": "clamped_swiglu", "router_bias": True, "expert_bias": True}
LAYERS = {
    # 128 experts, top-8; d_ff 96: the last 32-column chunk of phase 1 is full, the d_model
    # chunk of phase 2 too (256 = 2 x 128).
    "e128-k8-swiglu": MoEConfig(d_model=256, d_ff=96, num_experts=128, top_k=8, activation="swiglu"),
    # Widths off every chunk: d_model 200 (a 72-column last chunk), d_ff 136 (an 8-column one).
    "e32-k4-gpt-oss": MoEConfig(d_model=200, d_ff=136, num_experts=32, top_k=4, **_GPT_OSS),
    # 8 experts of top-2: at 3-4 tokens experts are shared between tokens (read once for all).
    "e8-k2-relu": MoEConfig(d_model=520, d_ff=200, num_experts=8, top_k=2, activation="relu"),
    # d_ff 1200: several row splits in phase 2.
    "e16-k4-swiglu-wide": MoEConfig(d_model=128, d_ff=1200, num_experts=16, top_k=4, activation="swiglu"),
}


def _bf16(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).bfloat16().float().numpy()


def _bf16_weights(weights):
    return dataclasses.replace(weights, **{
        f.name: _bf16(getattr(weights, f.name))
        for f in dataclasses.fields(weights) if getattr(weights, f.name) is not None
    })


@pytest.mark.parametrize("name", list(LAYERS))
def test_fused_decode_layer_matches_reference(rng, name):
    config = LAYERS[name]
    assert mops.fused_decode_tokens(config, "gpu", "bfloat16") == 4
    weights = _bf16_weights(MoEWeights.random(config, seed=int(rng.integers(2**31))))
    layer = MoELayer(config, weights, device="gpu", dtype="bfloat16", fused_decode=True)
    assert layer.fused_decode_tokens == 4
    for tokens in (1, 2, 3, 4, 5):
        x = _bf16(rng.standard_normal((tokens, config.d_model), dtype=np.float32))
        check_layer(layer, config, weights, x, BF16_TOL)


def test_fused_decode_is_deterministic_and_leaves_its_counters_at_zero(rng):
    config = LAYERS["e128-k8-swiglu"]
    layer = MoELayer(config, _bf16_weights(MoEWeights.random(config, seed=3)), device="gpu", dtype="bfloat16",
                     fused_decode=True)
    x = torch.from_numpy(_bf16(rng.standard_normal((3, config.d_model), dtype=np.float32))).bfloat16().cuda()
    first = layer.forward_unchecked(x).clone()
    for _ in range(5):
        torch.testing.assert_close(layer.forward_unchecked(x), first, rtol=0, atol=0)
    counters = torch.from_dlpack(layer._decode_scratch[0])[: mops.FUSED_DECODE_COUNTERS]
    assert (counters.view(torch.int32) == 0).all(), "the kernel must leave its counters at zero"


def test_fused_decode_in_a_stack_equals_the_layers_one_by_one(rng):
    """The layers of a stack share the scratch (they run in turn): the stack equals L single
    calls with the RMS norm between them."""
    config = LAYERS["e32-k4-gpt-oss"]
    layer = MoELayer(config, _bf16_weights(MoEWeights.random(config, seed=5)), device="gpu", dtype="bfloat16",
                     fused_decode=True)
    stack, _ = layer.stack(3)
    x = torch.from_numpy(_bf16(rng.standard_normal((2, config.d_model), dtype=np.float32))).bfloat16().cuda()
    y = x
    for _ in range(3):
        normed = torch.nn.functional.rms_norm(y.float(), (config.d_model,), eps=STACK_RMS_EPS)
        y = layer.forward_unchecked(normed.bfloat16())
    out = stack(x)
    err = ((out.float() - y.float()).norm() / y.float().norm()).item()
    assert err < 0.02, err
