"""MoELayer with the routers, expert biases, activations and shared experts of today's
models (tests/model_layer_cases.py) against the float64 reference, on the CPU."""

import numpy as np
import pytest
from conftest import FP32_TOL
from graphs import layer_graphs
from model_layer_cases import MODEL_CONFIGS, check_layer

from pymoe import MoELayer, MoEWeights
from pymoe import reference as R

# Compiled with the suite's other graphs (tests/graphs.py); the unpooled graph on gpt-oss.
GRAPHS = [*layer_graphs(MODEL_CONFIGS.values()), *layer_graphs([MODEL_CONFIGS["gpt-oss"]], pooled=False)]


@pytest.fixture(scope="module")
def layers():
    """One compiled graph per config; new weights reuse it."""
    return {name: MoELayer(cfg, MoEWeights.random(cfg, seed=0)) for name, cfg in MODEL_CONFIGS.items()}


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
@pytest.mark.parametrize("tokens", [1, 9, 200])
def test_model_layer_matches_reference(layers, rng, name, tokens):
    config = MODEL_CONFIGS[name]
    weights = MoEWeights.random(config, seed=int(rng.integers(2**31)))
    layer = MoELayer(config, weights)
    assert layer.compile_seconds == 0.0
    x = rng.standard_normal((tokens, config.d_model), dtype=np.float32)
    check_layer(layer, config, weights, x, FP32_TOL)


def test_each_extra_changes_the_output(rng):
    """The reference's extras are not no-ops: dropping any of them changes the layer's
    output, so the comparisons above test them."""
    import dataclasses

    config = MODEL_CONFIGS["deepseek-v3"]
    weights = MoEWeights.random(config, seed=3)
    x = rng.standard_normal((50, config.d_model))
    full = R.moe_layer(x, weights, config).out
    plain = dataclasses.replace(config, selection_bias=False, n_group=1, topk_group=1, shared_d_ff=0,
                                routed_scaling_factor=1.0)
    plain_w = MoEWeights(weights.router, weights.w1, weights.w2)
    assert np.abs(R.moe_layer(x, plain_w, plain).out - full).max() > 1e-2


def test_unpooled_graph_matches_reference(rng):
    """pooled=False (the graph allocates the intermediates) computes the same layer; on the
    config with every expert epilogue (biases, clamped SwiGLU), one graph for all of it."""
    config = MODEL_CONFIGS["gpt-oss"]
    weights = MoEWeights.random(config, seed=int(rng.integers(2**31)))
    layer = MoELayer(config, weights, pooled=False)
    assert layer.pool is None
    for tokens in (7, 17, 1000):
        x = rng.standard_normal((tokens, config.d_model), dtype=np.float32)
        check_layer(layer, config, weights, x, FP32_TOL)


def test_missing_or_extra_optional_weights_are_refused():
    config = MODEL_CONFIGS["gpt-oss"]
    weights = MoEWeights.random(config, seed=0)
    with pytest.raises(ValueError, match="b1"):
        MoELayer(config, MoEWeights(weights.router, weights.w1, weights.w2, router_bias=weights.router_bias))
    plain = MODEL_CONFIGS["llama4"]
    w = MoEWeights.random(plain, seed=0)
    with pytest.raises(ValueError, match="router_bias"):
        MoELayer(plain, MoEWeights(w.router, w.w1, w.w2, router_bias=np.zeros(5, np.float32),
                                   shared_w1=w.shared_w1, shared_w2=w.shared_w2))
