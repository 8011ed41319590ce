"""tests/test_model_layers.py on the GPU: MoELayer(device="gpu") with the routers, expert
biases, activations and shared experts of today's models against the float64 reference,
float32 and bfloat16, on the routed and the every-expert paths. Skipped without a GPU."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import BF16_TOL, gpu_fp32_tol
from max.driver import accelerator_count
from model_layer_cases import MODEL_CONFIGS, check_layer

from pymoe import MoELayer, MoEWeights

pytestmark = pytest.mark.skipif(accelerator_count() == 0, reason="MAX sees no GPU on this machine")


def _bf16(a):
    return torch.from_numpy(np.asarray(a, np.float32)).bfloat16().float().numpy()


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("every_expert", [False, True])
def test_gpu_model_layer_matches_reference(rng, name, dtype, every_expert):
    config = MODEL_CONFIGS[name]
    weights = MoEWeights.random(config, seed=int(rng.integers(2**31)))
    if dtype == "bfloat16":  # the reference sees the values the layer sees
        weights = dataclasses.replace(weights, **{
            f.name: _bf16(getattr(weights, f.name))
            for f in dataclasses.fields(weights) if getattr(weights, f.name) is not None
        })
    kwargs = {"every_expert_tokens": (1, 10**6)} if every_expert else {"every_expert_tokens": (1, 0)}
    layer = MoELayer(config, weights, device="gpu", dtype=dtype, **kwargs)
    for tokens in (1, 9, 200):
        x = _bf16(rng.standard_normal((tokens, config.d_model), dtype=np.float32))
        check_layer(layer, config, weights, x, gpu_fp32_tol(config) if dtype == "float32" else BF16_TOL)
