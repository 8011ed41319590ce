"""Expert biases and GPT-OSS's clamped SwiGLU in the CPU expert kernels
(moe_expert_matmul and moe_ffn) against the float64 reference, and their bad inputs.

Each graph holds many op variants, and the suite compiles them all once, together
(tests/graphs.py).
"""

from functools import partial

import numpy as np
import pytest
import torch
from conftest import BF16_TOL, FP32_TOL, rel_err
from graphs import REF, compiled, graph_builder, op_graph, run
from max.driver import Buffer
from max.dtype import DType
from max.graph import BufferType, Graph, TensorType, ops

import pymoe.ops as mops
from pymoe import reference as R
from pymoe.config import GATED_ACTIVATIONS

F32, BF16, I32 = DType.float32, DType.bfloat16, DType.int32
E, K, F = 5, 37, 45  # F: output columns of the gated activations; w has N = 2F = 90 (ragged panels)
N = 2 * F
SMALL = dict(alpha=1.0, limit=0.5)  # a small limit: most entries are clamped

# (activation, gather, packed, bias, alpha, limit). Every activation with a bias on the
# unpacked and the pre-packed kernels; clamped_swiglu in every combination, without a
# bias too, and with a small limit.
MM_VARIANTS = [
    *((act, p, p, True, 1.702, 7.0) for act in ("none", "relu", "silu", "swiglu") for p in (False, True)),
    *(("clamped_swiglu", g, p, True, 1.702, 7.0) for g in (False, True) for p in (False, True)),
    ("clamped_swiglu", False, False, False, 1.702, 7.0),
    ("clamped_swiglu", True, True, False, 1.702, 7.0),
    ("clamped_swiglu", True, False, True, SMALL["alpha"], SMALL["limit"]),
    ("clamped_swiglu", False, True, True, SMALL["alpha"], SMALL["limit"]),
]


def _matmul(x, rows, offsets, w, bias, variant):
    act, gather, packed, has_bias, alpha, limit = variant
    if packed:
        w = mops.pack_expert_weights(w, swiglu=act in GATED_ACTIVATIONS)
    return mops.moe_expert_matmul(
        x, rows, offsets, w, activation=act, gather=gather, packed=packed,
        bias=bias if has_bias else None, swiglu_alpha=alpha, swiglu_limit=limit,
    )


def _reference(x, rows, offsets, w, bias, variant):
    act, gather, _, has_bias, alpha, limit = variant
    return R.moe_expert_matmul(x, rows, offsets, w, act, gather, bias=bias if has_bias else None,
                               alpha=alpha, limit=limit)


def _matmul_input_types():
    """x [rows, K], row ids, offsets [E+1], w [E, K, N], bias [E, N] (float32; cast inside for bf16)."""
    return [
        TensorType(F32, ["r", K], REF),
        TensorType(I32, ["m"], REF),
        TensorType(I32, [E + 1], REF),
        TensorType(F32, [E, K, N], REF),
        TensorType(F32, [E, N], REF),
    ]


MATMUL = op_graph("expert_epilogues", _matmul_input_types(),
                  lambda x, rows, offsets, w, bias: [_matmul(x, rows, offsets, w, bias, v) for v in MM_VARIANTS])


@pytest.fixture(scope="module")
def matmul_model():
    return compiled(MATMUL)


def _groups(rng, sizes, total_rows):
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    # Three rows past the kept ones: slots dropped by a capacity, zeroed by the op.
    rows = rng.integers(0, total_rows, size=int(offsets[-1]) + 3).astype(np.int32)
    return rows, offsets


def _gate_up(x, rows, offsets, w, bias, gather):
    """The gated activations' input h = a @ w[e] + bias[e], for checking that the clamps bite."""
    return R.moe_expert_matmul(x, rows, offsets, w, "none", gather, bias=bias)


@pytest.mark.parametrize(
    "sizes",
    [
        [1, 0, 0, 0, 0],  # one row
        [3, 0, 4, 0, 0],  # empty experts
        [7, 7, 7, 7, 5],  # odd, below the micro-kernel height
        [300, 1, 0, 199, 13],  # big ragged groups (several MR tiles, an MC block edge)
    ],
)
def test_expert_matmul_epilogues_match_reference(matmul_model, rng, sizes):
    rows, offsets = _groups(rng, sizes, total_rows=50)
    x_gather = rng.standard_normal((50, K), dtype=np.float32)
    x_sorted = rng.standard_normal((len(rows), K), dtype=np.float32)
    # |h| ~ sqrt(K) ~ 6: the limit 7 clamps a good share of the entries, the limit 0.5 most.
    w = rng.standard_normal((E, K, N), dtype=np.float32)
    bias = (3 * rng.standard_normal((E, N))).astype(np.float32)
    h = _gate_up(x_gather, rows, offsets, w, bias, True)[: offsets[-1]]
    if offsets[-1] >= 20:
        assert (h[:, :F] > 7).any() and (np.abs(h[:, F:]) > 7).any(), "the clamps must bite"
    for gather in (False, True):
        x = x_gather if gather else x_sorted
        outs = run(matmul_model, x, rows, offsets, w, bias)
        for variant, out in zip(MM_VARIANTS, outs):
            if variant[1] != gather:
                continue
            ref = _reference(x, rows, offsets, w, bias, variant)
            assert out.shape == ref.shape, variant
            assert rel_err(out, ref) < FP32_TOL, variant
            assert (out[offsets[-1]:] == 0).all(), "rows past the kept ones must be zero"


def test_clamped_swiglu_differs_from_swiglu_and_bias_counts(matmul_model, rng):
    """Guards against a test that cannot fail: with these inputs the clamp and the bias
    change the result by far more than the tolerance."""
    rows, offsets = _groups(rng, [40, 0, 30, 20, 10], total_rows=50)
    x = rng.standard_normal((50, K), dtype=np.float32)
    w = rng.standard_normal((E, K, N), dtype=np.float32)
    bias = (3 * rng.standard_normal((E, N))).astype(np.float32)
    outs = run(matmul_model, x, rows, offsets, w, bias)
    clamped_bias = outs[MM_VARIANTS.index(("clamped_swiglu", True, True, True, 1.702, 7.0))]
    assert rel_err(clamped_bias, R.moe_expert_matmul(x, rows, offsets, w, "swiglu", True, bias=bias)) > 0.05
    assert rel_err(clamped_bias, R.moe_expert_matmul(x, rows, offsets, w, "clamped_swiglu", True)) > 0.05


# Decode sizes: few rows per expert and K > KC = 512 (kernels/cpu_blocking.mojo), so a
# tile's bias must go in on its first K slice only; the unpacked "relu" / "none" run the
# decode pipeline that packs the next block inside the micro-kernel (cpu_decode.mojo).
DEC_E, DEC_K, DEC_F = 3, 600, 260
DEC_VARIANTS = [
    (act, True, packed, True, 1.702, 7.0)
    for packed in (False, True)
    for act in ("none", "relu", "clamped_swiglu")
]


DECODE = op_graph(
    "expert_epilogues_decode",
    [
        TensorType(F32, ["r", DEC_K], REF),
        TensorType(I32, ["m"], REF),
        TensorType(I32, [DEC_E + 1], REF),
        TensorType(F32, [DEC_E, DEC_K, 2 * DEC_F], REF),
        TensorType(F32, [DEC_E, 2 * DEC_F], REF),
    ],
    lambda x, rows, offsets, w, bias: [_matmul(x, rows, offsets, w, bias, v) for v in DEC_VARIANTS],
)


@pytest.fixture(scope="module")
def decode_model():
    return compiled(DECODE)


@pytest.mark.parametrize("sizes", [[5, 12, 1], [1, 0, 0], [2, 0, 7]])
def test_expert_matmul_epilogues_decode_shapes(decode_model, rng, sizes):
    rows, offsets = _groups(rng, sizes, total_rows=20)
    x = rng.standard_normal((20, DEC_K), dtype=np.float32)
    w = (rng.standard_normal((DEC_E, DEC_K, 2 * DEC_F)) / 3).astype(np.float32)
    bias = (3 * rng.standard_normal((DEC_E, 2 * DEC_F))).astype(np.float32)
    outs = run(decode_model, x, rows, offsets, w, bias)
    for variant, out in zip(DEC_VARIANTS, outs):
        assert rel_err(out, _reference(x, rows, offsets, w, bias, variant)) < FP32_TOL, variant


# bfloat16: inputs, weights and biases rounded to bf16 in the graph; the reference sees
# the same rounded values.
BF16_VARIANTS = [
    ("clamped_swiglu", True, False, True, 1.702, 7.0),
    ("clamped_swiglu", True, True, True, 1.702, 7.0),
    ("relu", False, True, True, 1.702, 7.0),
]


def _bf16_forward(x, rows, offsets, w, bias):
    x, w, bias = (ops.cast(v, BF16) for v in (x, w, bias))
    return [ops.cast(_matmul(x, rows, offsets, w, bias, v), F32) for v in BF16_VARIANTS]


BF16_MATMUL = op_graph("expert_epilogues_bf16", _matmul_input_types(), _bf16_forward)


@pytest.fixture(scope="module")
def bf16_model():
    return compiled(BF16_MATMUL)


def _bf16(a):
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).to(torch.float32).numpy()


def test_expert_matmul_epilogues_bfloat16(bf16_model, rng):
    rows, offsets = _groups(rng, [9, 0, 33, 1, 20], total_rows=50)
    # One x for both: gathered rows index it, and its first len(rows) rows are the sorted ones.
    x = _bf16(rng.standard_normal((len(rows), K), dtype=np.float32))
    w = _bf16(rng.standard_normal((E, K, N), dtype=np.float32))
    bias = _bf16(3 * rng.standard_normal((E, N), dtype=np.float32))
    for variant, out in zip(BF16_VARIANTS, run(bf16_model, x, rows, offsets, w, bias)):
        ref = _reference(x, rows, offsets, w, bias, variant)
        assert rel_err(out, ref) < BF16_TOL, variant


# ---------------------------------------------------------------------------- moe_ffn

FFN_TOP_K = 2
# (activation, packed, b1, b2, alpha, limit)
FFN_VARIANTS = [
    ("clamped_swiglu", False, True, True, 1.702, 7.0),
    ("clamped_swiglu", True, True, True, 1.702, 7.0),
    ("clamped_swiglu", False, False, True, SMALL["alpha"], SMALL["limit"]),
    ("swiglu", True, True, False, 1.702, 7.0),
]


def _ffn_graph(dtype, variants, top_k, name, module):
    """gate -> dispatch -> moe_ffn for each variant; outputs the gate's weights and ids
    (the reference routes with them: near ties are the gate's tests' business) and each
    variant's output."""
    types = [
        TensorType(F32, ["t", K], REF),
        TensorType(F32, [K, E], REF),
        TensorType(F32, [E, K, N], REF),
        TensorType(F32, [E, F, K], REF),
        TensorType(F32, [E, N], REF),
        TensorType(F32, [E, K], REF),
        BufferType(dtype, ["rows", N], REF),
        BufferType(dtype, ["rows", K], REF),
    ]
    with Graph(name, input_types=types, custom_extensions=[mops.KERNELS_DIR], module=module) as g:
        x, router, w1, w2, b1, b2 = (ops.cast(v.tensor, dtype) for v in g.inputs[:6])
        workspaces = (g.inputs[6].buffer, g.inputs[7].buffer)
        gate = mops.moe_gate(x, router, top_k=top_k)
        disp = mops.moe_dispatch(gate.topk_ids, num_experts=E)
        outs = [gate.topk_weights, gate.topk_ids]
        for act, packed, has_b1, has_b2, alpha, limit in variants:
            p1 = mops.pack_expert_weights(w1, swiglu=True) if packed else w1
            p2 = mops.pack_expert_weights(w2) if packed else w2
            out = mops.moe_ffn(
                x, gate, disp, p1, p2, workspaces, activation=act, packed=packed,
                b1=b1 if has_b1 else None, b2=b2 if has_b2 else None, swiglu_alpha=alpha, swiglu_limit=limit,
            )
            outs.append(ops.cast(out, F32))
        g.output(*outs)
    return g


FFN = graph_builder("ffn_epilogues", partial(_ffn_graph, F32, FFN_VARIANTS, FFN_TOP_K))
# Compiled with the suite's other graphs (tests/graphs.py).
GRAPHS = [MATMUL, DECODE, BF16_MATMUL, FFN]


@pytest.fixture(scope="module")
def ffn_model():
    return compiled(FFN)


def _ffn_inputs(rng, tokens):
    x = rng.standard_normal((tokens, K), dtype=np.float32)
    router = rng.standard_normal((K, E), dtype=np.float32)
    w1 = rng.standard_normal((E, K, N), dtype=np.float32)
    w2 = (rng.standard_normal((E, F, K)) / np.sqrt(F)).astype(np.float32)
    b1 = 3 * rng.standard_normal((E, N), dtype=np.float32)
    b2 = rng.standard_normal((E, K), dtype=np.float32)
    return x, router, w1, w2, b1, b2


def _check_ffn(model, variants, inputs, tol):
    x, router, w1, w2, b1, b2 = inputs
    tokens = len(x)
    # Workspaces with more rows than needed, as the layer's pool has; stale values in them
    # must not leak into the result.
    h_ws = np.full((tokens * FFN_TOP_K + 5, N), 1e3, dtype=np.float32)
    y_ws = np.full((tokens * FFN_TOP_K + 5, K), 1e3, dtype=np.float32)
    buffers = [Buffer.from_numpy(a) for a in (*inputs, h_ws, y_ws)]
    weights, ids, *outs = (o.to_numpy() for o in model.execute(*buffers))
    disp = R.moe_dispatch(ids, E)
    for (act, _, has_b1, has_b2, alpha, limit), out in zip(variants, outs):
        ref = R.moe_ffn(x, weights, disp, w1, w2, act, b1 if has_b1 else None, b2 if has_b2 else None,
                        alpha, limit)
        assert out.shape == (tokens, K)
        assert rel_err(out, ref) < tol, (act, has_b1, has_b2, alpha, limit)


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_moe_ffn_biases_and_clamped_swiglu(ffn_model, rng, tokens):
    _check_ffn(ffn_model, FFN_VARIANTS, _ffn_inputs(rng, tokens), FP32_TOL)


# ----------------------------------------------------------------------- bad input

BAD_TYPES = [
    TensorType(F32, ["t", 8], REF),
    TensorType(I32, ["m"], REF),
    TensorType(I32, [5], REF),
    TensorType(F32, [4, 8, 12], REF),
    TensorType(F32, [4, 12], REF),
    TensorType(F32, [4, 6], REF),
    TensorType(BF16, [4, 12], REF),
    TensorType(F32, [8, 4], REF),
    TensorType(F32, [4, 6, 8], REF),
    BufferType(F32, ["rows", 12], REF),
    BufferType(F32, ["rows", 8], REF),
    TensorType(F32, [4, 8], REF),
]


def test_bad_biases_and_constants_raise_before_compiling():
    with Graph("bad_epilogues", input_types=BAD_TYPES, custom_extensions=[mops.KERNELS_DIR]) as g:
        x, rows, offsets, w, bias, narrow, bias16, router, w2 = (v.tensor for v in g.inputs[:9])
        workspaces = (g.inputs[9].buffer, g.inputs[10].buffer)
        b2 = g.inputs[11].tensor

        def mm(**kw):
            return mops.moe_expert_matmul(x, rows, offsets, w, **kw)

        mm(activation="clamped_swiglu", bias=bias)  # the good call builds
        with pytest.raises(ValueError, match=r"bias must have shape \[4, 12\]"):
            mm(bias=narrow)
        with pytest.raises(ValueError, match="bias must have shape"):
            mm(bias=bias[:3, :])
        with pytest.raises(ValueError, match="bias must have shape"):
            mm(bias=ops.reshape(bias, [48]))
        with pytest.raises(TypeError, match="bias dtype"):
            mm(bias=bias16)
        with pytest.raises(TypeError, match="bias must be None or a TensorValue"):
            mm(bias=np.zeros((4, 12), np.float32))
        for kw, what in (
            (dict(swiglu_limit=0.0), "swiglu_limit"), (dict(swiglu_limit=-1.0), "swiglu_limit"),
            (dict(swiglu_alpha=0.0), "swiglu_alpha"), (dict(swiglu_alpha=-2.0), "swiglu_alpha"),
            (dict(swiglu_limit=float("inf")), "swiglu_limit"), (dict(swiglu_alpha=float("nan")), "swiglu_alpha"),
        ):
            with pytest.raises(ValueError, match=what):
                mm(activation="clamped_swiglu", **kw)
        with pytest.raises(ValueError, match="even number of columns"):
            mops.moe_expert_matmul(x, rows, offsets, w[:, :, :11], activation="clamped_swiglu")

        gate = mops.moe_gate(x, router, top_k=2)
        disp = mops.moe_dispatch(gate.topk_ids, num_experts=4)

        def ffn(**kw):
            return mops.moe_ffn(x, gate, disp, w, w2, workspaces, activation="clamped_swiglu", **kw)

        ffn(b1=bias, b2=b2)  # the good call builds
        with pytest.raises(ValueError, match="b1 must have shape"):
            ffn(b1=narrow)
        with pytest.raises(ValueError, match=r"b2 must have shape \[4, 8\]"):
            ffn(b2=bias)
        with pytest.raises(TypeError, match="b1 dtype"):
            ffn(b1=bias16)
        with pytest.raises(ValueError, match="swiglu_limit"):
            ffn(swiglu_limit=-7.0)
        with pytest.raises(ValueError, match="swiglu_alpha"):
            ffn(swiglu_alpha=0.0)


def test_bfloat16_graphs_without_biases_build():
    """The placeholder that stands in for an absent bias takes x's dtype (bf16 too)."""
    types = [TensorType(BF16, ["t", 8], REF), TensorType(I32, ["m"], REF), TensorType(I32, [5], REF),
             TensorType(BF16, [4, 8, 12], REF), TensorType(BF16, [8, 4], REF), TensorType(BF16, [4, 6, 8], REF),
             BufferType(BF16, ["rows", 12], REF), BufferType(BF16, ["rows", 8], REF)]
    with Graph("bf16_no_bias", input_types=types, custom_extensions=[mops.KERNELS_DIR]) as g:
        x, rows, offsets, w, router, w2 = (v.tensor for v in g.inputs[:6])
        out = mops.moe_expert_matmul(x, rows, offsets, w, activation="clamped_swiglu")
        assert out.dtype == BF16 and int(out.shape[1]) == 6
        gate = mops.moe_gate(x, router, top_k=2)
        disp = mops.moe_dispatch(gate.topk_ids, num_experts=4)
        workspaces = (g.inputs[6].buffer, g.inputs[7].buffer)
        assert mops.moe_ffn(x, gate, disp, w, w2, workspaces, activation="clamped_swiglu").dtype == BF16
