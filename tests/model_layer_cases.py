"""Layer configs at small odd sizes shared by the test files, so that each compiles one graph
per session (the compile cache is per process, keyed by the whole config): the basic
routers and experts (tests/test_layer.py, the CLI and bench tests' preset) and layers shaped
like today's models (tests/test_model_layers.py, tests/test_gpu_model_layers.py). Each is also
the layer that pymoe.hf makes of a block of tests/hf_cases.py where one matches
(test_hf_models.py checks that they stay equal)."""

import numpy as np
from conftest import rel_err, routing_near_ties

from pymoe import MoEConfig, Preset
from pymoe import reference as R

# hf_cases' Mixtral block: d_model 27, d_ff 19, 5 experts, top-2 softmax renormalized.
_MIXTRAL = dict(d_model=27, d_ff=19, num_experts=5, top_k=2)
BASIC_CONFIGS = {
    "relu-renorm": MoEConfig(**_MIXTRAL, activation="relu"),
    "swiglu-renorm": MoEConfig(**_MIXTRAL, activation="swiglu"),  # the Mixtral block's layer
    # hf_cases' Switch block over 32 tokens with expert_capacity 5: capacity factor 5 * 4 / 32.
    "relu-switch-k1-capacity": MoEConfig(
        d_model=16, d_ff=28, num_experts=4, top_k=1, renormalize=False, capacity_factor=0.625
    ),
    "swiglu-k=E-capacity": MoEConfig(
        d_model=24, d_ff=17, num_experts=4, top_k=4, activation="swiglu", renormalize=False,
        capacity_factor=0.75,
    ),
}

# `pymoe check` and `pymoe bench` on the basic layers (the conftest fixture `test_preset`
# registers it): the real presets' layers are 1024 wide and cost minutes of weights,
# packing and compiles, for the same code paths.
TEST_PRESET = Preset("test-relu-renorm", BASIC_CONFIGS["relu-renorm"], (5,),
                     "decode: 5 tokens of tests/model_layer_cases.py's relu-renorm layer")

MODEL_CONFIGS = {
    # Qwen2-MoE: softmax top-k without renormalization, a sigmoid-gated shared expert.
    "qwen2-moe": MoEConfig(d_model=29, d_ff=23, num_experts=6, top_k=2, activation="swiglu",
                           renormalize=False, shared_d_ff=31, shared_gate=True),
    # DeepSeek-V3 / GLM-4.5: sigmoid scores, selection bias, 4 groups / top-2 groups,
    # scaling 2.5, an ungated shared expert.
    "deepseek-v3": MoEConfig(d_model=37, d_ff=19, num_experts=8, top_k=3, activation="swiglu",
                             scoring="sigmoid", selection_bias=True, n_group=4, topk_group=2,
                             routed_scaling_factor=2.5, shared_d_ff=38),
    # GPT-OSS: router bias, expert biases, clamped SwiGLU (a small limit so the clamps bite).
    "gpt-oss": MoEConfig(d_model=24, d_ff=21, num_experts=8, top_k=3, activation="clamped_swiglu",
                         router_bias=True, expert_bias=True, swiglu_limit=0.75),
    # Llama-4: top-1 sigmoid router scaling the expert's input, an ungated shared expert.
    "llama4": MoEConfig(d_model=33, d_ff=17, num_experts=5, top_k=1, activation="swiglu",
                        scoring="sigmoid", renormalize=False, weight_on_input=True, shared_d_ff=17),
}


def check_layer(layer, config, weights, x, tol):
    """The layer's output and statistics against the float64 reference. Tokens whose
    routing is a near-tie (float32 may choose differently) are left out of the output
    comparison; the counts are compared only when there is none."""
    res = layer.run(x)
    ref = R.moe_layer(x, weights, config)
    out = res.out.float().numpy() if hasattr(res.out, "float") else np.asarray(res.out, dtype=np.float64)
    ties = routing_near_ties(x, weights, config)
    assert ties.mean() < 0.2, "too many near-ties for a meaningful check"
    err = rel_err(out[~ties], ref.out[~ties])
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"
    if not ties.any():
        np.testing.assert_array_equal(res.expert_counts, ref.gate.expert_counts)
        assert abs(res.aux_loss - ref.gate.aux_loss) <= 1e-3 * ref.gate.aux_loss
    assert abs(res.z_loss - ref.gate.z_loss) <= 1e-3 * abs(ref.gate.z_loss) + 1e-6
    assert res.dropped_slots == 0
    return res, ref


def graphs_of_other_files() -> dict[str, list]:
    """The graphs (tests/graphs.py) of tests in files that build pymoe layers without listing
    them in a GRAPHS of their own, by "module::test": conftest compiles these with the suite's
    other graphs when the test is collected. A layer missing here still works; it only costs
    a compilation of its own."""
    # pymoe.offload.host.HostExpertGroup (the engine's host worker, and what
    # calibration.measure_host_compute times) on test_offload_hybrid's "tiny-host" shape.
    from test_offload_hybrid import HOST_SHAPE, HOST_TESTS

    from pymoe.offload.host import group_graph_specs

    host = group_graph_specs(HOST_SHAPE)
    return {f"test_offload_hybrid::{name}": host for name in HOST_TESTS}

