"""Layer configs shaped like today's models at small odd sizes, shared by the CPU and GPU
layer tests (tests/test_model_layers.py, tests/test_gpu_model_layers.py)."""

import numpy as np
from conftest import rel_err, routing_near_ties

from pymoe import MoEConfig
from pymoe import reference as R

MODEL_CONFIGS = {
    # Qwen2-MoE: softmax top-k without renormalization, a sigmoid-gated shared expert.
    "qwen2-moe": MoEConfig(d_model=29, d_ff=23, num_experts=6, top_k=2, activation="swiglu",
                           renormalize=False, shared_d_ff=31, shared_gate=True),
    # DeepSeek-V3 / GLM-4.5: sigmoid scores, selection bias, 4 groups / top-2 groups,
    # scaling 2.5, an ungated shared expert.
    "deepseek-v3": MoEConfig(d_model=37, d_ff=19, num_experts=16, top_k=4, activation="swiglu",
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
