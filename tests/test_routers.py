"""Every router of ops.moe_gate on the CPU against the float64 reference
(pymoe.reference.moe_gate): softmax and sigmoid scores, router bias, selection bias,
group-limited top-k, renormalization and scaling, in float32 and bfloat16. The variants
are in tests/router_cases.py; each graph holds all of its variants and compiles once."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import FP32_TOL, rel_err, routing_near_ties
from graphs import REF, compiled, op_graph, run
from max.dtype import DType
from max.graph import DeviceRef, Graph, TensorType
from router_cases import (
    DEEPSEEK_V3,
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
from pymoe.routing import route

ROUTERS = op_graph("routers", input_types(REF), forward)
GRAPHS = [ROUTERS]  # compiled with the suite's other graphs (tests/graphs.py)


@pytest.fixture(scope="module")
def routers_model():
    return compiled(ROUTERS)


@pytest.mark.parametrize("tokens,d", [(1, 37), (7, 37), (33, 16), (300, 9)])
def test_routers_match_reference(routers_model, rng, tokens, d):
    arrays = random_inputs(rng, tokens, d)
    check_all(run(routers_model, *arrays), arrays)


def test_ties_go_to_the_lower_index(routers_model):
    """All logits equal (zero x, zero biases): every score ties, every group ties, so
    each variant takes experts 0..k-1 (groups 0.. kept), weighted by their scores."""
    arrays = [np.zeros_like(a) for a in random_inputs(np.random.default_rng(0), 4, 5)]
    outs = run(routers_model, *arrays)
    for i, c in enumerate(float32_variants()):
        weights, ids = outs[5 * i], outs[5 * i + 1]
        np.testing.assert_array_equal(ids, np.tile(np.arange(c.top_k), (4, 1)), err_msg=str(c))
        score = 1 / c.num_experts if c.scoring == "softmax" else 0.5
        expected = (1 / c.top_k if c.renormalize else score) * c.routed_scaling_factor
        np.testing.assert_allclose(weights, expected, rtol=1e-6, err_msg=str(c))


def test_gpt_oss_router_is_renormalized_softmax_with_router_bias(routers_model, rng):
    """GPT-OSS routes by top-k of the logits (router bias included) and a softmax over the
    k chosen logits: the same as softmax scores + router bias + renormalize."""
    arrays = random_inputs(rng, 50, 37)
    x, w, rb, _ = inputs_of(arrays, GPT_OSS)
    ids, weights = gpt_oss_routing(x, w, rb, GPT_OSS.top_k)
    ref = route(x.astype(np.float64) @ w + rb, GPT_OSS.top_k, GPT_OSS.renormalize)
    np.testing.assert_array_equal(ref.ids, ids)
    np.testing.assert_allclose(ref.weights, weights, rtol=1e-12)
    out_w, out_ids = outputs_of(run(routers_model, *arrays), GPT_OSS)[:2]
    ok = ~routing_near_ties(x, SimpleNamespace(router=w, router_bias=rb, selection_bias=None), GPT_OSS)
    assert ok.sum() > 40
    np.testing.assert_array_equal(out_ids[ok], ids[ok])
    assert rel_err(out_w[ok], weights[ok]) < FP32_TOL


def test_llama4_router_is_top1_sigmoid(routers_model, rng):
    """Llama-4: the expert of the best logit, weighted by its sigmoid (not renormalized)."""
    arrays = random_inputs(rng, 50, 37)
    x, w, _, _ = inputs_of(arrays, LLAMA4)
    ids, weights = llama4_routing(x, w)
    out_w, out_ids = outputs_of(run(routers_model, *arrays), LLAMA4)[:2]
    ok = ~routing_near_ties(x, SimpleNamespace(router=w, router_bias=None, selection_bias=None), LLAMA4)
    np.testing.assert_array_equal(out_ids[ok], ids[ok])
    assert rel_err(out_w[ok], weights[ok]) < FP32_TOL
    assert (out_w < 1).all()  # a sigmoid, not a renormalized 1


def test_selection_bias_chooses_but_does_not_weight(routers_model, rng):
    """A large selection bias on expert 5 makes DeepSeek-V3's router take it for every
    token, weighted by its unbiased sigmoid score (renormalized, times the scaling)."""
    arrays = random_inputs(rng, 20, 16)
    x, w, _, sb = inputs_of(arrays, DEEPSEEK_V3)
    sb[:] = 0
    sb[5] = 10.0
    weights, ids = outputs_of(run(routers_model, *arrays), DEEPSEEK_V3)[:2]
    assert (ids[:, 0] == 5).all()
    s = 1 / (1 + np.exp(-(x.astype(np.float64) @ w)))
    chosen = np.take_along_axis(s, ids.astype(np.int64), axis=1)
    expected = chosen[:, 0] / chosen.sum(axis=1) * DEEPSEEK_V3.routed_scaling_factor
    np.testing.assert_allclose(weights[:, 0], expected, rtol=1e-5)


def _graph_checks(device=REF, experts=16):
    # No custom_extensions: these graphs never reach a kernel (loading the package costs
    # as much as a compile).
    types = [
        TensorType(DType.float32, ["t", 8], device),
        TensorType(DType.float32, [8, experts], device),
        TensorType(DType.float32, [experts], device),
        TensorType(DType.float32, [experts + 1], device),
        TensorType(DType.bfloat16, [experts], device),
        TensorType(DType.float32, [1, experts], device),
    ]
    return Graph("bad_router", input_types=types)


@pytest.fixture
def recorded_ops(monkeypatch):
    """ops.custom_op replaced by a recorder: what moe_gate would add to the graph."""
    calls = []

    def record(name, values, out_types, parameters=None):
        calls.append((name, values, parameters))
        return [None] * len(out_types)

    monkeypatch.setattr(mops, "custom_op", record)
    return calls


def test_bad_router_arguments_fail_before_compiling(recorded_ops):
    with _graph_checks() as g:
        x, w, bias, long_bias, bf16_bias, bias2d = (v.tensor for v in g.inputs)
        cases = [
            (ValueError, "router_bias must have shape", {"router_bias": long_bias}),
            (TypeError, "selection_bias must be float32", {"selection_bias": bf16_bias}),
            (ValueError, "selection_bias must have shape", {"selection_bias": bias2d}),
            (TypeError, "router_bias must be None or a TensorValue", {"router_bias": np.zeros(16, np.float32)}),
            (ValueError, "scoring", {"scoring": "relu"}),
            (ValueError, "n_group", {"n_group": 3, "topk_group": 1}),
            (ValueError, "topk_group", {"n_group": 4, "topk_group": 5}),
            (ValueError, "topk_group", {"topk_group": 2}),
            (ValueError, "two best", {"n_group": 16, "topk_group": 2}),
            (ValueError, "kept groups", {"n_group": 4, "topk_group": 1, "top_k": 5}),
            (ValueError, "routed_scaling_factor", {"routed_scaling_factor": 0.0}),
            (ValueError, "routed_scaling_factor", {"routed_scaling_factor": -2.5}),
            (ValueError, "routed_scaling_factor", {"routed_scaling_factor": float("inf")}),
            (ValueError, "top_k", {"top_k": 17}),
        ]
        for error, match, kwargs in cases:
            kwargs = {"top_k": 2, **kwargs}
            with pytest.raises(error, match=match):
                mops.moe_gate(x, w, **kwargs)
        assert recorded_ops == []
        # The accepted forms reach the kernel with their rule as compile-time parameters:
        # the old call, and a DeepSeek-style one.
        mops.moe_gate(x, w, top_k=2, renormalize=False)
        mops.moe_gate(x, w, top_k=4, scoring="sigmoid", router_bias=bias, selection_bias=bias,
                      n_group=4, topk_group=2, routed_scaling_factor=2)
    (name, values, old), (_, new_values, new) = recorded_ops
    # x, router, the two biases, the logits and their partial rows (placeholders on the CPU:
    # the gate computes the logits)
    assert name == "pymoe_moe_gate" and len(values) == len(new_values) == 6
    assert old == {"top_k": 2, "renormalize": False, "scoring": "softmax", "has_router_bias": False,
                   "has_selection_bias": False, "n_group": 1, "topk_group": 1, "scaling": 1.0,
                   "logits_given": False, "routed_slots": 1}
    assert new == {"top_k": 4, "renormalize": True, "scoring": "sigmoid", "has_router_bias": True,
                   "has_selection_bias": True, "n_group": 4, "topk_group": 2, "scaling": 2.0,
                   "logits_given": False, "routed_slots": 1}
    assert isinstance(new["scaling"], float)
    assert list(values[2].shape) == [1] and new_values[2] is bias  # the placeholder, the bias


def test_gpu_routers_have_an_expert_limit(recorded_ops):
    """The GPU kernel of the routers other than the default holds at most 512 experts;
    the graph API says so before compiling (building a GPU graph needs no GPU)."""
    e = mops.GATE_GPU_ROUTED_MAX_EXPERTS + 8
    with _graph_checks(DeviceRef.GPU(), e) as g:
        x, w, bias = (v.tensor for v in g.inputs[:3])
        with pytest.raises(ValueError, match="at most 512 experts"):
            mops.moe_gate(x, w, top_k=2, scoring="sigmoid")
        with pytest.raises(ValueError, match="at most 512 experts"):
            mops.moe_gate(x, w, top_k=2, selection_bias=bias)
        mops.moe_gate(x, w, top_k=2, router_bias=bias)  # the softmax kernel has no limit
    assert len(recorded_ops) == 1


def test_gpu_dispatch_has_an_expert_limit(recorded_ops):
    """The GPU dispatch keeps a count per expert in shared memory: at most 512 experts, said
    before compiling; the CPU's has no limit."""
    e = mops.DISPATCH_GPU_MAX_EXPERTS + 1
    for device in (DeviceRef.GPU(), REF):
        with Graph("dispatch", input_types=[TensorType(DType.int32, ["t", 2], device)]) as g:
            ids = g.inputs[0].tensor
            if device == REF:
                mops.moe_dispatch(ids, num_experts=e)
            else:
                with pytest.raises(ValueError, match="at most 512 experts"):
                    mops.moe_dispatch(ids, num_experts=e)
                mops.moe_dispatch(ids, num_experts=e - 1)
    assert [name for name, _, _ in recorded_ops] == ["pymoe_moe_dispatch"] * 2


def test_gpu_gate_takes_its_logits_from_a_tensor_core_gemm(recorded_ops):
    """On the GPU with 16-bit inputs and widths that are multiples of 8 the router's logits
    are their own op (pymoe_router_logits) and the gate only selects; float32, or widths the
    tensor-core kernel does not take, keep the gate computing them (building a GPU graph
    needs no GPU)."""
    gpu = DeviceRef.GPU()
    for dtype, d_model, experts, given in [(DType.bfloat16, 8, 16, True), (DType.float32, 8, 16, False),
                                           (DType.bfloat16, 12, 16, False), (DType.bfloat16, 8, 20, False)]:
        recorded_ops.clear()
        types = [TensorType(dtype, ["t", d_model], gpu), TensorType(dtype, [d_model, experts], gpu)]
        with Graph("gate_logits", input_types=types) as g:
            x, w = (v.tensor for v in g.inputs)
            mops.moe_gate(x, w, top_k=2)
        names = [name for name, _, _ in recorded_ops]
        assert names == (["pymoe_router_logits", "pymoe_moe_gate"] if given else ["pymoe_moe_gate"])
        assert recorded_ops[-1][2]["logits_given"] is given
        assert recorded_ops[-1][2]["routed_slots"] == 1  # 16 or 20 experts: one slot of 32 per lane
        # With given logits the gate also gets the router GEMV's partial rows (its scratch
        # output) and may add them itself at decode, so the logits op is built to leave them
        # to it; the public router_logits op always sums (test_gpu_routers checks both on a GPU).
        assert len(recorded_ops[-1][1]) == 6
        if given:
            assert recorded_ops[0][2] == {"partials_to_gate": True}


def test_gpu_gate_keeps_the_fewest_register_slots_that_hold_the_experts(recorded_ops):
    """The GPU gate's token kernel holds a token's E logits in registers, 32 per slot; the op
    compiles it with the fewest slots (a power of two) that hold E, so that an E = 128 router
    does not pay for 512 experts' slots in each top-k round."""
    gpu = DeviceRef.GPU()
    for experts, slots in [(8, 1), (32, 1), (33, 2), (128, 4), (160, 8), (256, 8), (512, 16)]:
        recorded_ops.clear()
        types = [TensorType(DType.bfloat16, ["t", 64], gpu), TensorType(DType.bfloat16, [64, experts], gpu)]
        with Graph("gate_slots", input_types=types) as g:
            x, w = (v.tensor for v in g.inputs)
            mops.moe_gate(x, w, top_k=2)
        assert recorded_ops[-1][2]["routed_slots"] == slots == mops.gate_routed_slots(experts)


def test_the_router_gemv_scratch_mirrors_the_kernel():
    """pymoe.ops.router_gemv_scratch_floats sizes the GPU router op's scratch output as
    kernels/moe_gate.mojo's router_gemv_scratch_floats does (too small a scratch makes the op
    raise at run time): the same constants, and the formula at the presets' router shapes."""
    source = (mops.KERNELS_DIR / "moe_gate.mojo").read_text()
    for name in ("ROUTER_GEMV_MAX_TOKENS", "ROUTER_GEMV_BLOCK_BYTES", "ROUTER_GEMV_MIN_SPLITS",
                 "ROUTER_GEMV_MAX_SPLITS"):
        assert int(re.search(rf"^comptime {name} = (\d+)", source, re.M).group(1)) == getattr(mops, name), name
    # blocks of router rows: Qwen3-30B-A3B 32 (64 rows of 256 bytes), DeepSeek-V3 224 (32 of 512),
    # Mixtral 32 (at least 32 blocks), and a wide router of 1024-row blocks.
    for d_model, experts, blocks in [(2048, 128, 32), (7168, 256, 224), (4096, 8, 32), (2880, 32, 32),
                                     (400000, 8, 391)]:
        assert mops.router_gemv_scratch_floats(d_model, experts, 2) == blocks * 8 * experts, (d_model, experts)
