"""Every router of ops.moe_gate on the GPU against the float64 reference: the cases of
tests/test_routers.py (tests/router_cases.py), among them E=128 k=8 and DeepSeek-V3's
E=256 with 8 groups, 4 kept, k=8, float32 and bfloat16, on few and on many tokens (the
grid-stride loop and the per-block statistics). Both GPU kernels run: the online-softmax
one (softmax routers, with and without router bias and scaling) and the one of every
other router. Skipped where MAX sees no GPU. On a GPU machine:
`pytest tests/test_gpu_routers.py`."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FP32_TOL, rel_err, routing_near_ties
from max.driver import Buffer, accelerator_count
from max.dtype import DType
from max.graph import Graph, TensorType, ops
from router_cases import (
    GPT_OSS,
    LLAMA4,
    check_all,
    float32_variants,
    forward,
    gpt_oss_routing,
    input_types,
    inputs_of,
    llama4_routing,
    outputs_of,
    random_inputs,
)

import pymoe.ops as mops

pytestmark = pytest.mark.skipif(accelerator_count() == 0, reason="MAX sees no GPU on this machine")


@pytest.fixture(scope="module")
def routers_model(gpu):
    _, ref, session = gpu
    with Graph("gpu_routers", input_types=input_types(ref), custom_extensions=[mops.KERNELS_DIR]) as g:
        g.output(*forward(*(v.tensor for v in g.inputs)))
    return session.load(g)


def _run(gpu, model, *arrays):
    from max.driver import CPU

    outs = model.execute(*(Buffer.from_numpy(np.ascontiguousarray(a)).to(gpu[0]) for a in arrays))
    return [o.to(CPU()).to_numpy() for o in outs]


# 8 tokens fill one block's warps; 3000 tokens give every warp of the grid several.
@pytest.mark.parametrize("tokens,d", [(1, 37), (8, 64), (33, 16), (300, 9), (3000, 40)])
def test_gpu_routers_match_reference(gpu, routers_model, rng, tokens, d):
    """Every variant, float32 and bfloat16 (tests/router_cases.py)."""
    arrays = random_inputs(rng, tokens, d)
    check_all(_run(gpu, routers_model, *arrays), arrays)


def test_gpu_ties_go_to_the_lower_index(gpu, routers_model):
    arrays = [np.zeros_like(a) for a in random_inputs(np.random.default_rng(0), 4, 5)]
    outs = _run(gpu, routers_model, *arrays)
    for i, c in enumerate(float32_variants()):
        weights, ids = outs[5 * i], outs[5 * i + 1]
        np.testing.assert_array_equal(ids, np.tile(np.arange(c.top_k), (4, 1)), err_msg=str(c))
        score = 1 / c.num_experts if c.scoring == "softmax" else 0.5
        expected = (1 / c.top_k if c.renormalize else score) * c.routed_scaling_factor
        np.testing.assert_allclose(weights, expected, rtol=1e-6, err_msg=str(c))


def test_gpu_gpt_oss_and_llama4_routers(gpu, routers_model, rng):
    arrays = random_inputs(rng, 50, 37)
    outs = _run(gpu, routers_model, *arrays)
    x, w, rb, _ = inputs_of(arrays, GPT_OSS)
    ids, weights = gpt_oss_routing(x, w, rb, GPT_OSS.top_k)
    out_w, out_ids = outputs_of(outs, GPT_OSS)[:2]
    ok = ~routing_near_ties(x, SimpleNamespace(router=w, router_bias=rb, selection_bias=None), GPT_OSS)
    np.testing.assert_array_equal(out_ids[ok], ids[ok])
    assert rel_err(out_w[ok], weights[ok]) < FP32_TOL
    ids, weights = llama4_routing(x, w)
    out_w, out_ids = outputs_of(outs, LLAMA4)[:2]
    ok = ~routing_near_ties(x, SimpleNamespace(router=w, router_bias=None, selection_bias=None), LLAMA4)
    np.testing.assert_array_equal(out_ids[ok], ids[ok])
    assert rel_err(out_w[ok], weights[ok]) < FP32_TOL


# The router logits op at the presets' real router shapes (d_model x E): up to
# ROUTER_GEMV_MAX_TOKENS (8) tokens the split-K GEMV, above it the tensor-core GEMM. In a
# kernel-only bench every DeepSeek-V3-shaped GEMV output was NaN while the same shape alone
# was right (docs/RESULTS.md, "Session 22 on the H100"): this checks it inside MAX.
def _bf16(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).bfloat16().float().numpy()


ROUTER_SHAPES = {"qwen3-30b-a3b": (2048, 128), "gpt-oss-20b": (2880, 32), "mixtral-8x7b": (4096, 8),
                 "deepseek-v3": (7168, 256), "qwen3-235b-a22b": (4096, 128)}


@pytest.mark.parametrize("name", list(ROUTER_SHAPES))
def test_gpu_router_logits_at_model_widths(gpu, rng, name):
    d_model, experts = ROUTER_SHAPES[name]
    _, ref, session = gpu
    types = [TensorType(DType.float32, ["t", d_model], ref), TensorType(DType.float32, [d_model, experts], ref)]
    with Graph(f"router_logits_{name}", input_types=types, custom_extensions=[mops.KERNELS_DIR]) as g:
        x, w = (ops.cast(v.tensor, DType.bfloat16) for v in g.inputs)
        g.output(mops.router_logits(x, w))
    model = session.load(g)
    w = _bf16(rng.standard_normal((d_model, experts), dtype=np.float32) / np.sqrt(d_model))
    for tokens in (1, 3, 8, 9, 24):
        x = _bf16(rng.standard_normal((tokens, d_model), dtype=np.float32))
        got = _run(gpu, model, x, w)[0]
        want = x.astype(np.float64) @ w.astype(np.float64)
        assert np.isfinite(got).all(), (name, tokens)
        assert rel_err(got, want) < FP32_TOL, (name, tokens, rel_err(got, want))


# The gate given the router GEMV's partial rows (kernels/moe_gate.mojo,
# router_partials_to_gate): a decode batch with T * E <= 256 skips the GEMV's sum kernel and
# the gate's block adds the partial rows itself. Cases folded: Qwen3-30B-A3B at 1 token,
# GPT-OSS-20B's E = 32 at 1 and 8, DeepSeek-V3's E = 256 (sigmoid, 8 groups) at 1; not folded:
# Qwen3 at 8 (1024 logits) and 9 tokens (the GEMM). The routing must be the float64 route of
# the logits that the public logits op (which always sums) gives for the same x: the same
# float32 adds in the same order, so the same choices, bit for bit, away from near-ties.
GATE_CASES = {"qwen3-30b-a3b": (2048, 128, 8, {}), "gpt-oss-20b": (2880, 32, 4, {}),
              "deepseek-v3": (7168, 256, 8, {"scoring": "sigmoid", "n_group": 8, "topk_group": 4,
                                             "routed_scaling_factor": 2.5})}


@pytest.mark.parametrize("name", list(GATE_CASES))
def test_gpu_gate_adds_the_router_partials_at_decode(gpu, rng, name):
    from pymoe.routing import route

    d_model, experts, top_k, rule = GATE_CASES[name]
    _, ref, session = gpu
    types = [TensorType(DType.float32, ["t", d_model], ref), TensorType(DType.float32, [d_model, experts], ref)]
    with Graph(f"gate_partials_{name}", input_types=types, custom_extensions=[mops.KERNELS_DIR]) as g:
        x, w = (ops.cast(v.tensor, DType.bfloat16) for v in g.inputs)
        gate = mops.moe_gate(x, w, top_k=top_k, **rule)
        g.output(gate.topk_weights, gate.topk_ids, gate.expert_counts, mops.router_logits(x, w))
    model = session.load(g)
    w = _bf16(rng.standard_normal((d_model, experts), dtype=np.float32) / np.sqrt(d_model))
    for tokens in (1, 8, 9):
        x = _bf16(rng.standard_normal((tokens, d_model), dtype=np.float32))
        weights, ids, counts, logits = _run(gpu, model, x, w)
        want = route(logits.astype(np.float64), top_k, scoring=rule.get("scoring", "softmax"),
                     n_group=rule.get("n_group", 1), topk_group=rule.get("topk_group", 1),
                     scaling=rule.get("routed_scaling_factor", 1.0))
        np.testing.assert_array_equal(ids, want.ids, err_msg=f"{name} at {tokens} tokens")
        assert rel_err(weights, want.weights) < 1e-5, (name, tokens)
        np.testing.assert_array_equal(counts, np.bincount(ids.ravel(), minlength=experts))
