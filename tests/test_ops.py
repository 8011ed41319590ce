"""Every custom op against its float64 reference, on fresh random inputs."""

import dataclasses

import numpy as np
import pytest
from conftest import FP32_TOL, near_tie_tokens, rel_err
from graphs import REF, compiled, op_graph, run
from max.dtype import DType
from max.graph import TensorType, ops

import pymoe.ops as mops
from pymoe import reference as R
from pymoe.config import get_preset

F32, I32 = DType.float32, DType.int32

# -------------------------------------------------------------- activations


ELEMENTWISE = op_graph(
    "elementwise",
    [TensorType(F32, ["r", "c"], REF), TensorType(F32, ["r", "c"], REF)],
    lambda a, b: [mops.softmax(a), mops.relu(a), mops.silu(a), mops.swiglu(a, b)],
)


@pytest.fixture(scope="module")
def elementwise_model():
    return compiled(ELEMENTWISE)


@pytest.mark.parametrize("shape", [(1, 1), (7, 37), (33, 13), (1000, 8), (3, 1025)])
def test_activations_match_reference(elementwise_model, rng, shape):
    a = rng.standard_normal(shape, dtype=np.float32) * 3
    b = rng.standard_normal(shape, dtype=np.float32)
    soft, relu, silu, swiglu = run(elementwise_model, a, b)
    assert rel_err(soft, R.softmax(a)) < FP32_TOL
    assert rel_err(relu, R.relu(a)) == 0.0
    assert rel_err(silu, R.silu(a)) < FP32_TOL
    assert rel_err(swiglu, R.swiglu(a, b)) < FP32_TOL
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-5)


def test_softmax_is_stable_for_huge_logits(elementwise_model, rng):
    a = (rng.standard_normal((9, 21)) * 1e4).astype(np.float32)
    a[0] = 3e38  # every entry at the float32 limit: uniform, not NaN
    soft = run(elementwise_model, a, a)[0]
    assert np.isfinite(soft).all()
    assert rel_err(soft, R.softmax(a)) < FP32_TOL


# --------------------------------------------------------------------- gate

GATE_EXPERTS = 6
GATE_VARIANTS = [(1, False), (2, True), (2, False), (GATE_EXPERTS, True)]


def _gate_forward(x, router):
    outs = []
    for k, renorm in GATE_VARIANTS:
        outs.extend(mops.moe_gate(x, router, top_k=k, renormalize=renorm))
    return outs


GATE = op_graph("gate", [TensorType(F32, ["t", "d"], REF), TensorType(F32, ["d", GATE_EXPERTS], REF)], _gate_forward)


@pytest.fixture(scope="module")
def gate_model():
    return compiled(GATE)


@pytest.mark.parametrize("tokens,d", [(1, 5), (7, 37), (33, 16), (1000, 9)])
def test_gate_matches_reference(gate_model, rng, tokens, d):
    x = rng.standard_normal((tokens, d), dtype=np.float32)
    router = rng.standard_normal((d, GATE_EXPERTS), dtype=np.float32)
    outs = run(gate_model, x, router)
    for i, (k, renorm) in enumerate(GATE_VARIANTS):
        weights, ids, counts, prob_mean, losses = outs[5 * i : 5 * i + 5]
        ref = R.moe_gate(x, router, k, renorm)
        ok = ~near_tie_tokens(x, router, k)
        np.testing.assert_array_equal(ids[ok], ref.topk_ids[ok])
        assert rel_err(weights[ok], ref.topk_weights[ok]) < FP32_TOL
        np.testing.assert_array_equal(counts, np.bincount(ids.ravel(), minlength=GATE_EXPERTS))
        assert rel_err(prob_mean, ref.router_prob_mean) < FP32_TOL
        if ok.all():
            assert abs(losses[0] - ref.aux_loss) / ref.aux_loss < FP32_TOL
        assert abs(losses[1] - ref.z_loss) / max(ref.z_loss, 1e-12) < FP32_TOL
        assert ids.dtype == np.int32 and weights.shape == (tokens, k)


def test_gate_ties_go_to_the_lower_index(gate_model):
    x = np.zeros((4, 3), dtype=np.float32)  # every logit 0: all experts tie
    router = np.zeros((3, GATE_EXPERTS), dtype=np.float32)
    outs = run(gate_model, x, router)
    for i, (k, renorm) in enumerate(GATE_VARIANTS):
        weights, ids = outs[5 * i], outs[5 * i + 1]
        np.testing.assert_array_equal(ids, np.tile(np.arange(k), (4, 1)))
        np.testing.assert_allclose(weights, 1 / k if renorm else 1 / GATE_EXPERTS, rtol=1e-6)


def test_gate_all_tokens_on_one_expert(gate_model, rng):
    x = np.abs(rng.standard_normal((50, 4), dtype=np.float32)) + 0.5
    router = np.full((4, GATE_EXPERTS), -1.0, dtype=np.float32)
    router[:, 3] = 5.0
    weights, ids, counts = run(gate_model, x, router)[:3]  # k = 1
    assert (ids == 3).all()
    np.testing.assert_array_equal(counts, [0, 0, 0, 50, 0, 0])


# ----------------------------------------------------------------- dispatch

DISPATCH_EXPERTS = 5
CAPACITIES = [None, 1.0, 0.5, 1.25]


def _dispatch_forward(ids):
    t, k = ids.shape
    outs = []
    for cf in CAPACITIES:
        d = mops.moe_dispatch(ids, num_experts=DISPATCH_EXPERTS, capacity_factor=cf)
        # Graph outputs cannot have computed shapes (t*k): reshape to [t, k].
        outs += [ops.reshape(d.sorted_token_ids, [t, k]), d.expert_offsets, ops.reshape(d.slot_to_row, [t, k])]
    return outs


DISPATCH = op_graph("dispatch", [TensorType(I32, ["t", "k"], REF)], _dispatch_forward)


@pytest.fixture(scope="module")
def dispatch_model():
    return compiled(DISPATCH)


@pytest.mark.parametrize("tokens,k", [(1, 1), (7, 2), (33, 3), (1000, 2), (40, DISPATCH_EXPERTS)])
def test_dispatch_matches_reference(dispatch_model, rng, tokens, k):
    ids = np.stack([rng.permutation(DISPATCH_EXPERTS)[:k] for _ in range(tokens)]).astype(np.int32)
    if tokens == 1000:
        ids[:600, 0] = 0  # a hot expert, so that capacities drop slots
    outs = run(dispatch_model, ids)
    for i, cf in enumerate(CAPACITIES):
        sorted_ids, offsets, slot_to_row = outs[3 * i : 3 * i + 3]
        ref = R.moe_dispatch(ids, DISPATCH_EXPERTS, cf)
        np.testing.assert_array_equal(offsets, ref.expert_offsets)
        kept = int(ref.expert_offsets[-1])
        np.testing.assert_array_equal(sorted_ids.ravel()[:kept], ref.sorted_token_ids[:kept])
        np.testing.assert_array_equal(slot_to_row.ravel(), ref.slot_to_row)


def test_dispatch_capacity_drops_the_later_tokens(dispatch_model):
    ids = np.zeros((10, 1), dtype=np.int32)  # all on expert 0; capacity 1.0 keeps ceil(10/5)=2
    sorted_ids, offsets, slot_to_row = run(dispatch_model, ids)[3:6]
    np.testing.assert_array_equal(offsets, [0, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(slot_to_row.ravel(), [0, 1] + [-1] * 8)
    np.testing.assert_array_equal(sorted_ids.ravel()[:2], [0, 1])


def test_dispatch_rejects_out_of_range_ids(dispatch_model):
    with pytest.raises(Exception, match="out of range"):
        run(dispatch_model, np.array([[0], [DISPATCH_EXPERTS]], dtype=np.int32))


# ------------------------------------------------------------ expert matmul

MM_E, MM_K, MM_N, MM_F = 5, 37, 19, 11
# packed: the weights go through pack_expert_weights first (the layout
# MoELayer keeps on the CPU); N = 19 and F = 11 leave a ragged last panel.
MM_VARIANTS = [
    (act, gather, packed)
    for act in ("none", "relu", "silu", "swiglu")
    for gather in (False, True)
    for packed in (False, True)
]


def _matmul(x, rows, offsets, w, act, gather, packed):
    if packed:
        w = mops.pack_expert_weights(w, swiglu=act == "swiglu")
    return mops.moe_expert_matmul(x, rows, offsets, w, activation=act, gather=gather, packed=packed)


MATMUL = op_graph(
    "expert_matmul",
    [
        TensorType(F32, ["r", MM_K], REF),
        TensorType(I32, ["m"], REF),
        TensorType(I32, [MM_E + 1], REF),
        TensorType(F32, [MM_E, MM_K, MM_N], REF),
        TensorType(F32, [MM_E, MM_K, 2 * MM_F], REF),
    ],
    lambda x, rows, offsets, w, w_glu: [
        _matmul(x, rows, offsets, w_glu if act == "swiglu" else w, act, g, p) for act, g, p in MM_VARIANTS
    ],
)


@pytest.fixture(scope="module")
def matmul_model():
    return compiled(MATMUL)


def _groups(rng, sizes, total_rows):
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    rows = rng.integers(0, total_rows, size=max(int(offsets[-1]) + 3, 1)).astype(np.int32)
    return rows, offsets


@pytest.mark.parametrize(
    "sizes",
    [
        [1, 0, 0, 0, 0],  # one row
        [3, 0, 4, 0, 0],  # empty experts
        [7, 7, 7, 7, 5],  # odd, below the micro-kernel height
        [500, 1, 0, 299, 200],  # all in big ragged groups
        [0, 0, 0, 0, 64],  # all rows on one expert
    ],
)
def test_expert_matmul_matches_reference(matmul_model, rng, sizes):
    rows, offsets = _groups(rng, sizes, total_rows=50)
    m = len(rows)
    x_gather = rng.standard_normal((50, MM_K), dtype=np.float32)
    x_sorted = rng.standard_normal((m, MM_K), dtype=np.float32)
    w = rng.standard_normal((MM_E, MM_K, MM_N), dtype=np.float32)
    w_glu = rng.standard_normal((MM_E, MM_K, 2 * MM_F), dtype=np.float32)
    for gather in (False, True):
        x = x_gather if gather else x_sorted
        outs = run(matmul_model, x, rows, offsets, w, w_glu)
        for (act, g, packed), out in zip(MM_VARIANTS, outs):
            if g != gather:
                continue
            ref = R.moe_expert_matmul(x, rows, offsets, w_glu if act == "swiglu" else w, act, gather)
            assert out.shape == ref.shape
            assert rel_err(out, ref) < FP32_TOL, (act, gather, packed)
            assert (out[offsets[-1] :] == 0).all(), "rows past the kept ones must be zero"


# Decode-sized shapes: few rows per expert, weights wide and deep enough for
# the CPU's decode schedule to cut several slices and jobs and to pack each
# next block while computing the current one (kernels/cpu_decode.mojo);
# N = 1030 leaves a job whose width is not a whole number of panels (packed
# without the pipeline). The same products with pre-packed weights: several
# K slices per panel, read panel by panel. The narrow weights (DEC_NARROW
# columns, 7 panels with a ragged one) with one expert of more than
# DECODE_ROWS rows take the prefill schedule with few jobs, whose column
# blocks narrow to spread them over the workers (already with 2 threads).
DEC_E, DEC_K, DEC_F, DEC_NARROW = 3, 600, 520, 200


DECODE_MATMUL = op_graph(
    "expert_matmul_decode",
    [
        TensorType(F32, ["r", DEC_K], REF),
        TensorType(I32, ["m"], REF),
        TensorType(I32, [DEC_E + 1], REF),
        TensorType(F32, [DEC_E, DEC_K, 2 * DEC_F], REF),
        TensorType(F32, [DEC_E, DEC_K, 1030], REF),
        TensorType(F32, [DEC_E, DEC_K, DEC_NARROW], REF),
    ],
    lambda x, rows, offsets, w, w_odd, w_narrow: [
        _matmul(x, rows, offsets, weights, act, True, packed)
        for packed in (False, True)
        for weights, act in ((w, "relu"), (w_odd, "none"), (w, "swiglu"), (w_narrow, "relu"), (w_narrow, "swiglu"))
    ],
)


@pytest.fixture(scope="module")
def decode_matmul_model():
    return compiled(DECODE_MATMUL)


@pytest.mark.parametrize("sizes", [[5, 12, 1], [20, 13, 7], [25, 3, 0], [1, 0, 0], [0, 30, 0]])
def test_expert_matmul_decode_shapes_match_reference(decode_matmul_model, rng, sizes):
    rows, offsets = _groups(rng, sizes, total_rows=40)
    x = rng.standard_normal((40, DEC_K), dtype=np.float32)
    w = rng.standard_normal((DEC_E, DEC_K, 2 * DEC_F), dtype=np.float32)
    w_odd = rng.standard_normal((DEC_E, DEC_K, 1030), dtype=np.float32)
    w_narrow = rng.standard_normal((DEC_E, DEC_K, DEC_NARROW), dtype=np.float32)
    outs = run(decode_matmul_model, x, rows, offsets, w, w_odd, w_narrow)
    cases = 2 * ((w, "relu"), (w_odd, "none"), (w, "swiglu"), (w_narrow, "relu"), (w_narrow, "swiglu"))
    for out, (weights, act) in zip(outs, cases, strict=True):
        ref = R.moe_expert_matmul(x, rows, offsets, weights, act, True)
        assert rel_err(out, ref) < FP32_TOL, (act, sizes)


# ------------------------------------------------------------------ combine


COMBINE = op_graph(
    "combine",
    [TensorType(F32, ["m", "d"], REF), TensorType(F32, ["t", "k"], REF), TensorType(I32, ["s"], REF)],
    lambda y, w, s: [mops.moe_combine(y, w, s)],
)
# Compiled together with the rest of the suite's graphs (tests/graphs.py).
GRAPHS = [ELEMENTWISE, GATE, DISPATCH, MATMUL, DECODE_MATMUL, COMBINE]


@pytest.fixture(scope="module")
def combine_model():
    return compiled(COMBINE)


@pytest.mark.parametrize("tokens,k,d", [(1, 1, 1), (7, 2, 37), (33, 3, 16), (1000, 2, 9)])
def test_combine_matches_reference(combine_model, rng, tokens, k, d):
    m = tokens * k
    y = rng.standard_normal((m, d), dtype=np.float32)
    weights = rng.random((tokens, k), dtype=np.float32)
    slot_to_row = rng.permutation(m).astype(np.int32)
    slot_to_row[rng.random(m) < 0.2] = -1  # dropped slots contribute nothing
    out = run(combine_model, y, weights, slot_to_row)[0]
    assert rel_err(out, R.moe_combine(y, weights, slot_to_row)) < FP32_TOL


# ------------------------------------------------------------- fused decode


def _kernel_plan_floats(slots: int, d_model: int, d_ff: int, sm_count: int) -> int:
    """The float32s one call of the fused decode kernel uses after its counters, as
    kernels/moe_decode.mojo plans them (fused_decode_plan, fused_decode_scratch_floats)."""
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    c2 = cdiv(d_model, mops.FUSED_DECODE_BN2)
    ks2 = max(1, min(cdiv(2 * sm_count, slots * c2), d_ff // mops.FUSED_DECODE_MIN_ROWS2))
    rows2 = min(cdiv(cdiv(d_ff, ks2), 32) * 32, mops.FUSED_DECODE_MAX_ROWS2)
    return slots * d_ff + cdiv(d_ff, rows2) * slots * d_model


def test_fused_decode_rule_and_scratch_size():
    """Which layers may run the fused decode kernel (16-bit GPU layers, no capacity limit,
    widths multiples of 8, up to 64 slots), and that the scratch MoELayer allocates holds what
    the kernel plans for every batch it takes on any GPU size."""
    qwen = get_preset("qwen3-30b-a3b").config
    assert mops.fused_decode_tokens(qwen, "gpu", "bfloat16") == 4
    assert mops.fused_decode_tokens(qwen, "gpu", "float16") == 4
    assert mops.fused_decode_tokens(qwen, "gpu", "float32") == 0
    assert mops.fused_decode_tokens(qwen, "cpu", "bfloat16") == 0
    assert mops.fused_decode_tokens(dataclasses.replace(qwen, capacity_factor=1.25), "gpu", "bfloat16") == 0
    assert mops.fused_decode_tokens(dataclasses.replace(qwen, d_ff=770), "gpu", "bfloat16") == 0
    assert mops.fused_decode_tokens(dataclasses.replace(qwen, num_experts=64, top_k=32), "gpu", "bfloat16") == 2
    for name in ("qwen3-30b-a3b", "gpt-oss-120b", "mixtral-8x7b", "deepseek-v3"):
        config = get_preset(name).config
        have = mops.fused_decode_scratch_floats(config) - mops.FUSED_DECODE_COUNTERS
        for sm_count in (1, 46, 132, 170, 1000):
            for tokens in range(1, mops.fused_decode_tokens(config, "gpu", "bfloat16") + 1):
                need = _kernel_plan_floats(tokens * config.top_k, config.d_model, config.d_ff, sm_count)
                assert need <= have, (name, sm_count, tokens)


def test_staging_a_graph_asks_the_kernel_library_once_per_package_set(monkeypatch):
    """MAX's `name in KernelLibrary` lists every symbol of the loaded packages (over a second per
    new graph on a 2-core CPU): pymoe.ops._ensure_kernels_loaded asks it once per set of loaded
    packages, not for every op or every graph."""
    import max.graph.graph as max_graph
    from max.graph import Module

    from pymoe import MoEConfig, runtime

    asked = []
    contains = max_graph.KernelLibrary.__contains__
    monkeypatch.setattr(max_graph.KernelLibrary, "__contains__",
                        lambda library, name: asked.append(name) or contains(library, name))
    monkeypatch.setattr(mops, "_HOLDS_PYMOE_OPS", {})
    config = MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2)
    graph = runtime.moe_graph_spec(config, "cpu", "float32", True, stack=2).build("staging_probe", Module())
    custom_ops = str(graph._module).count("mo.custom")
    assert custom_ops >= 6 and asked == ["pymoe_moe_gate"], (custom_ops, asked)
